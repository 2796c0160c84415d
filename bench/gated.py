"""One model, many budgets: the level table of a budget-gated model (issue 15).

For the trained transformer fixture (budgets 1, 0.75, 0.5) and the trained wide MLP of
``models/wide_mlp.py`` (64-1024-1024-1024-10, budgets 1, 0.5, 0.25; needs torch, trained
here), ``compress --budgets`` makes one gated model, fitted on the calibration split.
Per level, measured on the test split (which neither the plan nor the verification saw):

* parameters and FLOPs of the weight operators in use at that level;
* the relative output error against the original and the top-1 accuracy, for the
  gated model at that level (and for one whose levels are priced by their measured
  effect on the output, ``--pricing output``), for a standalone ``compress --keep
  <budget>`` (today's defaults) and for ``--refit on`` (the error-correcting second
  factors, which are not nested and so not gated: what gating without them gives up);
* onnxruntime latency (CPU, one intra-op thread: the work a level does, not how threads
  are scheduled on a shared machine) of one run over the whole test split and of one
  sample, for the gated model as written (one ``If`` chain over whole-model branches),
  the same levels with an ``If`` chain per gated operator (``form="operator"``) and the
  standalone model: the median of ``ROUNDS`` timings taken in interleaved rounds (every
  model once per round) so load on the machine hits all of them alike.

Last, the graph forms a gated level could take, on one 1024-wide layer with levels dense,
256, 192, 128, every level at batch 1 and 450, interleaved in one run: a standalone model
per level (constant factors), the form ``compress --budgets`` wrote first (``Slice`` of
the pair stored at the largest rank: copies on every run, weights not pre-packed), the
nested pieces summed (the smallest rank's pair, each further piece of directions added
under an ``If`` only the levels using it take), and one constant pair per distinct rank
chosen by ``If``s, per operator or over whole-model branches (what it writes now,
:func:`~qmpass.rewrite.gated_lowrank.build_gated`).

``python bench/gated.py`` (``--forms``: only the last part). ``--llama DIR [--size S]
[--rounds N] [--reuse]``: instead, the level table of the LLaMA layout ``bench/scale.py
--sizes S`` (default ``small``) wrote into ``DIR`` (``bench/gated_llama.py``; ``--reuse``
times the compressed models a previous run left in ``DIR/gated_bench``).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Collection, Hashable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import models  # noqa: E402
from qmpass.algebra.gated import GatedFactors  # noqa: E402
from qmpass.compress import CompressConfig, compress, compress_gated  # noqa: E402
from qmpass.compress.gated_report import stored_params  # noqa: E402
from qmpass.extract import extract_operators  # noqa: E402
from qmpass.rewrite.base import name_nodes  # noqa: E402
from qmpass.rewrite.gated_lowrank import GATED_INPUT, GatedForm, build_gated  # noqa: E402
from qmpass.verify import accuracy, compare, run_model  # noqa: E402
from qmpass.verify.runner import session  # noqa: E402

ROUNDS = 15
Key = TypeVar("Key", bound=Hashable)


Case = tuple[str, onnx.ModelProto, dict[str, np.ndarray], np.ndarray, np.ndarray,
             tuple[float, ...]]


def _cases() -> list[Case]:
    name = "transformer_digits"
    model = onnx.load(str(models.fixture_path(name)))
    calib = models.load_calib(name)
    x, y = models.load_test_split(name)
    cases: list[Case] = [(name, model, calib, x, y, (1.0, 0.75, 0.5))]
    try:
        from models import _common, wide_mlp
    except ImportError as exc:  # torch is the models extra
        print(f"(wide MLP skipped: {exc})")
        return cases
    wide, wide_calib, x_test = wide_mlp.build()
    y_test = _common.load_split((64,)).y_test
    cases.append((wide_mlp.NAME, wide, wide_calib, x_test, y_test, (1.0, 0.5, 0.25)))
    return cases


def _latencies(runs: Mapping[Key, tuple[onnx.ModelProto, dict[str, np.ndarray]]],
               batch: int | None, rounds: int = ROUNDS) -> dict[Key, float]:
    """:func:`_timings` by the wall clock."""
    return _timings(runs, batch, rounds)[0]


def _timings(runs: Mapping[Key, tuple[onnx.ModelProto, dict[str, np.ndarray]]],
             batch: int | None, rounds: int = ROUNDS, repeat: int | None = None,
             clocks: tuple[Callable[[], float], ...] = (time.perf_counter,),
             unpacked: Collection[Key] = ()) -> list[dict[Key, float]]:
    """Median ms of one run on the first ``batch`` samples (None: the feeds as they are),
    per key, over ``rounds`` interleaved rounds (after a warm-up; every model once per
    round, in an order shuffled per round), single-threaded; ``repeat`` runs per timing
    (default: enough that short runs are not all timer noise). With several ``clocks``
    (e.g. ``time.thread_time`` too: onnxruntime runs a one-thread session on the calling
    thread, so that is the CPU time of the run, which load on a shared machine disturbs
    less than wall time), one result per clock. The sessions of ``unpacked`` keys run
    with onnxruntime's pre-packing of constant weights switched off."""
    made: dict[tuple[int, bool], ort.InferenceSession] = {}  # one per model (memory)
    for k, (m, _) in runs.items():
        if (id(m), k in unpacked) not in made:
            made[(id(m), k in unpacked)] = _session(m, k in unpacked)
    sessions = {k: (made[(id(m), k in unpacked)],
                    {n: a if a.ndim == 0 or batch is None else a[:batch]
                     for n, a in feeds.items()})
                for k, (m, feeds) in runs.items()}
    repeat = repeat or max(1, 256 // (batch or 1))
    times: list[dict[Key, list[float]]] = [{k: [] for k in runs} for _ in clocks]
    for _ in range(2):
        for sess, feeds in sessions.values():
            sess.run(None, feeds)
    order = list(sessions)
    shuffle = np.random.default_rng(0)
    for _ in range(rounds):
        for index in shuffle.permutation(len(order)):
            key = order[index]
            sess, feeds = sessions[key]
            start = [clock() for clock in clocks]
            for _ in range(repeat):
                sess.run(None, feeds)
            for clock, begun, column in zip(clocks, start, times, strict=True):
                column[key].append((clock() - begun) / repeat)
    return [{k: 1e3 * statistics.median(v) for k, v in column.items()} for column in times]


def _session(model: onnx.ModelProto, unpacked: bool = False) -> ort.InferenceSession:
    """A one-thread CPU session (``unpacked``: constant weights not pre-packed)."""
    if not unpacked:
        return session(model, threads=1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _error(reference: list[np.ndarray], model: onnx.ModelProto,
           feeds: dict[str, np.ndarray], samples: int) -> float:
    return compare(reference, run_model(model, feeds), samples).relative_error


def _level_forms(width: int = 1024, ranks: tuple[int | None, ...] = (None, 256, 192, 128),
                 rounds: int = 25) -> None:
    """One gated ``width``-wide layer four ways, every level at batch 1 and 450 (see the
    module docstring); each form's stored parameters beside its times."""
    rng = np.random.default_rng(0)
    widest = max(q for q in ranks if q is not None)
    weight = rng.normal(size=(width, width)) / np.sqrt(width)
    first = rng.normal(size=(widest, width)) / np.sqrt(width)
    second = rng.normal(size=(width, widest)) / np.sqrt(widest)
    biases = rng.normal(size=(len(ranks), width))
    record = GatedFactors(first, second, ranks, biases, weight, (width,))
    forms = _Forms(width, record)
    models_ = {"standalone (one model per level)": None,
               "sliced (before: `Slice` of the stored pair)": forms.sliced(),
               "pieces summed (nested `If`s)": forms.pieces(),
               "one pair per rank, `If` chain per operator (`form=\"operator\"`)":
                   forms.built("operator"),
               "one pair per rank, whole-model `If` chain (written)": forms.built("model")}
    x = rng.normal(size=(450, width)).astype(np.float32)
    for batch in (1, len(x)):
        runs = {}
        for level in range(len(ranks)):
            for key, model in models_.items():
                if model is None:
                    runs[(key, level)] = (forms.standalone(level), {"x": x})
                else:
                    runs[(key, level)] = (model, {"x": x, GATED_INPUT: np.array(level)})
        latency = _latencies(runs, batch, rounds)
        print(f"\n### one {width}-wide layer, levels of rank "
              f"{', '.join(str(q or 'dense') for q in ranks)}: ms at batch {batch}\n")
        print("| form | params stored | " + " | ".join(f"level {k}" for k in range(len(ranks)))
              + " |\n|---|---:|" + "---:|" * len(ranks))
        for key, model in models_.items():
            stored = (sum(stored_params(forms.standalone(k)) for k in range(len(ranks)))
                      if model is None else stored_params(model))
            print(f"| {key} | {stored:,} | " + " | ".join(
                f"{latency[(key, k)]:.4f}" for k in range(len(ranks))) + " |")


class _Forms:
    """The candidate graphs of one gated layer (``record``; level 0 dense); every form
    adds the level's bias the same way (``Gather`` of the level's row)."""

    def __init__(self, width: int, record: GatedFactors) -> None:
        self.width, self.record, self.names = width, record, 0

    def _name(self, base: str) -> str:
        self.names += 1
        return f"{base}{self.names}"

    def _const(self, array: np.ndarray, base: str = "c") -> onnx.TensorProto:
        kind = np.int64 if array.dtype.kind == "i" else np.float32
        return numpy_helper.from_array(np.ascontiguousarray(array, dtype=kind), self._name(base))

    def _info(self, name: str, kind: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, kind, ["batch", self.width])

    def _model(self, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto],
               gated: bool = True) -> onnx.ModelProto:
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", self.width])]
        if gated:
            inputs.append(helper.make_tensor_value_info(GATED_INPUT, TensorProto.INT64, []))
        graph = helper.make_graph(nodes, "layer", inputs, [self._info("y")], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model

    def _pair(self, lo: int, hi: int, out: str) -> tuple[list[onnx.NodeProto],
                                                         list[onnx.TensorProto]]:
        a = self._const(self.record.first[lo:hi].T, "first")
        b = self._const(self.record.second[:, lo:hi].T, "second")
        hidden = self._name("hidden")
        return [helper.make_node("MatMul", ["x", a.name], [hidden]),
                helper.make_node("MatMul", [hidden, b.name], [out])], [a, b]

    def _if(self, bound: int, then: tuple[list[onnx.NodeProto], list[onnx.TensorProto], str],
            other: tuple[list[onnx.NodeProto], list[onnx.TensorProto], str], out: str
            ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        """``out = then if budget_level < bound else other`` (each: nodes, constants, out)."""
        c, cond = self._const(np.array(bound)), self._name("cond")
        graphs = [helper.make_graph(n, self._name("g"), [], [self._info(o)], i)
                  for n, i, o in (then, other)]
        return [helper.make_node("Less", [GATED_INPUT, c.name], [cond]),
                helper.make_node("If", [cond], [out], then_branch=graphs[0],
                                 else_branch=graphs[1])], [c]

    def _gate(self, factored: tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]
              ) -> onnx.ModelProto:
        """The dense level in one branch; the factored product plus the level's bias in
        the other."""
        assert self.record.weight is not None
        w, b = self._const(self.record.weight.T), self._const(self.record.biases[0])
        dense = ([helper.make_node("MatMul", ["x", w.name], ["dense_xw"]),
                  helper.make_node("Add", ["dense_xw", b.name], ["dense_y"])], [w, b], "dense_y")
        nodes, inits, product = factored
        biases = self._const(self.record.biases, "biases")
        nodes = [*nodes, helper.make_node("Gather", [biases.name, GATED_INPUT], ["bias"]),
                 helper.make_node("Add", [product, "bias"], ["factored_y"])]
        return self._model(*self._if(self.record.dense_levels, dense,
                                     (nodes, [*inits, biases], "factored_y"), "y"))

    def standalone(self, level: int) -> onnx.ModelProto:
        q, bias = self.record.ranks[level], self._const(self.record.biases[level])
        if q is None:
            assert self.record.weight is not None
            w = self._const(self.record.weight.T)
            nodes, inits = [helper.make_node("MatMul", ["x", w.name], ["xw"])], [w]
        else:
            nodes, inits = self._pair(0, q, "xw")
        return self._model([*nodes, helper.make_node("Add", ["xw", bias.name], ["y"])],
                           [*inits, bias], gated=False)

    def sliced(self) -> onnx.ModelProto:
        """The form this one replaced: the rank gathered, the stored pair sliced."""
        rec = self.record
        table = self._const(np.array([q or rec.rank for q in rec.ranks]))
        zero, one, axes = self._const(np.array([0])), self._const(np.array([1])), \
            self._const(np.array([0]))
        a, b = self._const(rec.first.T, "first"), self._const(rec.second.T, "second")
        nodes = [helper.make_node("Unsqueeze", [GATED_INPUT, axes.name], ["level_1d"]),
                 helper.make_node("Gather", [table.name, "level_1d"], ["q"]),
                 helper.make_node("Slice", [a.name, zero.name, "q", one.name], ["a"]),
                 helper.make_node("Slice", [b.name, zero.name, "q", zero.name], ["b"]),
                 helper.make_node("MatMul", ["x", "a"], ["h"]),
                 helper.make_node("MatMul", ["h", "b"], ["product"])]
        return self._gate((nodes, [table, zero, one, axes, a, b], "product"))

    def _ascending(self) -> tuple[list[int], list[int]]:
        """The distinct ranks, smallest first, and the bound below which a level's rank is
        at least each."""
        ranks = sorted({q for q in self.record.ranks if q is not None})
        return ranks, [sum(q is None or q >= r for q in self.record.ranks) for r in ranks]

    def pieces(self) -> onnx.ModelProto:
        """The smallest rank's pair, then each next piece of directions added under an
        ``If`` that only the levels using it take (its constants in that branch)."""
        ranks, bounds = self._ascending()

        def piece(j: int, total: str | None) -> tuple[list[onnx.NodeProto],
                                                      list[onnx.TensorProto], str]:
            out = self._name("piece")
            nodes, inits = self._pair(ranks[j - 1] if j else 0, ranks[j], out)
            if total is not None:
                nodes.append(helper.make_node("Add", [total, out], [summed := self._name("sum")]))
                out = summed
            if j + 1 == len(ranks):
                return nodes, inits, out
            same = self._name("same")
            keep: tuple[list[onnx.NodeProto], list[onnx.TensorProto], str] = (
                [helper.make_node("Identity", [out], [same])], [], same)
            more, extra = self._if(bounds[j + 1], piece(j + 1, out), keep,
                                   result := self._name("result"))
            return [*nodes, *more], [*inits, *extra], result

        return self._gate(piece(0, None))

    def built(self, form: GatedForm) -> onnx.ModelProto:
        """What ``compress --budgets`` writes (:func:`build_gated`), in ``form``."""
        model = self.standalone(0)
        ops = extract_operators(name_nodes(model)).operators
        gated, declined = build_gated(name_nodes(model), {op.name: op for op in ops},
                                      [(ops, self.record)], (1.0, 0.75, 0.5, 0.25), form)
        assert not declined
        return gated


def _table(name: str, original: onnx.ModelProto, calib: dict[str, np.ndarray],
           x: np.ndarray, y: np.ndarray, budgets: tuple[float, ...]) -> None:
    """The level tables of one model (see the module docstring)."""
    feeds = {original.graph.input[0].name: x}
    reference = run_model(original, feeds)
    config = CompressConfig(budgets=budgets, calib=calib)
    gated, report = compress_gated(original, config, standalone=False)
    per_op, _ = compress_gated(original, config, standalone=False, form="operator")
    priced, priced_report = compress_gated(original, replace(config, pricing="output"),
                                           standalone=False)
    runs = {"original": (original, feeds)}
    rows = []
    for row in report.levels:
        level_feeds = {**feeds, GATED_INPUT: np.array(row.level)}
        runs[f"level {row.level}"] = (gated, level_feeds)
        runs[f"per-op {row.level}"] = (per_op, level_feeds)
        if row.budget < 1.0:
            alone, _ = compress(original, CompressConfig(keep=row.budget, calib=calib))
            refit, _ = compress(original, CompressConfig(keep=row.budget, calib=calib,
                                                         refit="on"))
        else:
            alone = refit = original
        runs[f"alone {row.level}"] = (alone, feeds)
        err = _error(reference, gated, level_feeds, len(x))
        err_alone = _error(reference, alone, feeds, len(x))
        rows.append((row, f"{err:.4f} | {_error(reference, priced, level_feeds, len(x)):.4f} | "
                          f"{err_alone:.4f} | {err - err_alone:+.4f} | "
                          f"{_error(reference, refit, feeds, len(x)):.4f} | "
                          f"{accuracy(gated, level_feeds, y):.4f} | "
                          f"{accuracy(alone, feeds, y):.4f}"))
    latency = {batch: _latencies(runs, batch) for batch in (len(x), 1)}
    doc = report.to_dict()
    print(f"\n### {name}: {len(x)} test samples, budgets {', '.join(map(str, budgets))}")
    print(f"\noriginal: {report.operator_params:,} weight-operator parameters, "
          f"{report.operator_flops:,} FLOPs/sample, accuracy "
          f"{accuracy(original, feeds, y):.4f}, {latency[len(x)]['original']:.3f} ms "
          f"(batch {len(x)}), {latency[1]['original']:.3f} ms (batch 1). Stored parameters: "
          f"the gated file {doc['params_stored']:,} (the per-operator form "
          f"{stored_params(per_op):,}), the original {doc['params_before']:,}. Levels "
          f"priced by {doc['pricing']}; with --pricing output their ranks are "
          + ("the same" if [r['ranks'] for r in doc['levels']] ==
             [r['ranks'] for r in priced_report.to_dict()['levels']] else "different")
          + "\n")
    print("| level | budget | params in use | FLOPs in use | error gated | error gated, "
          "--pricing output | error standalone | nesting cost | error standalone refit | "
          "accuracy gated | accuracy standalone |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row, errors in rows:
        print(f"| {row.level} | {row.budget:g} | {row.params:,} | {row.flops:,} | {errors} |")
    print(f"\n| level | ms gated (batch {len(x)}) | ms per-operator form | ms standalone | "
          "ms gated (batch 1) | ms per-operator form | ms standalone | gated / standalone "
          "(batch 1) |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row, _ in rows:
        timed = [latency[b][f"{who} {row.level}"] for b in (len(x), 1)
                 for who in ("level", "per-op", "alone")]
        print(f"| {row.level} | " + " | ".join(f"{t:.3f}" for t in timed)
              + f" | {timed[3] / timed[5]:.2f}x |", flush=True)


def main() -> int:
    started = time.perf_counter()
    if "--llama" in sys.argv[1:]:  # the model of real size (bench/gated_llama.py)
        import gated_llama

        at = sys.argv.index("--llama") + 1
        if at == len(sys.argv) or not Path(sys.argv[at]).is_dir():
            print("--llama needs the folder bench/scale.py --sizes small wrote.",
                  file=sys.stderr)
            return 2
        size = sys.argv[sys.argv.index("--size") + 1] if "--size" in sys.argv else "small"
        rounds = (int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv
                  else gated_llama.ROUNDS)
        gated_llama.scopes(_timings)
        gated_llama.table(Path(sys.argv[at]), _timings, size, "--reuse" in sys.argv, rounds)
        return 0
    if "--forms" not in sys.argv[1:]:
        for case in _cases():
            _table(*case)
    _level_forms()
    print(f"\n{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
