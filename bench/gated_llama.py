"""The level table of a budget-gated model of real size: the ``small`` LLaMA layout of
``bench/scale.py`` (61.5 M parameters, 4 layers, 1024 wide, vocabulary 8,000; **random
weights**, so its errors say nothing about a trained model's).

``compress --budgets 1,0.75,0.5`` makes one gated model (fitted on the layout's 16
calibration sequences of 16 tokens); beside it the same levels in the form written
before (each level nested in an ``If`` chain, its shared weights two scopes up: rebuilt
here from the written model's branches by :func:`nested_form`) and a standalone
``compress --keep <budget>`` per level. Per level: the weight operators' parameters in
use; the relative output error on 16 fresh random sequences (no plan saw them) of the
gated level and of the standalone model; onnxruntime latency (CPU, one intra-op thread)
of one run of 1 and of 4 sequences, the median of interleaved rounds (every model once
per round, order shuffled per round), by the wall clock and by the thread's CPU time;
the parameters each file stores.

First, why the nested form was slow (:func:`scopes`): one 1024 x 1024 MatMul at 64 rows
inside an ``If``, its weight stored in the branch, one scope up, two scopes up, in the
graph right above a branch that is itself nested, and in the branch with onnxruntime's
pre-packing switched off (``session.disable_prepacking``).

``python bench/scale.py --sizes small --commands analyze --dir DIR`` writes the model,
then ``python bench/gated.py --llama DIR`` (about 20 minutes on the shared 2-core
machine, most of it the three compressions).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qmpass.compress import CompressConfig, compress, compress_gated
from qmpass.compress.gated_report import stored_params
from qmpass.rewrite.gated_lowrank import GATED_INPUT
from qmpass.verify import compare, run_model

BUDGETS = (1.0, 0.75, 0.5)
#: bench/gated.py's ``_timings``: (runs, batch, rounds, repeat, clocks) -> ms per clock
Timings = Callable[..., list[dict[Any, float]]]
ROUNDS = 21


def nested_form(gated: onnx.ModelProto) -> onnx.ModelProto:
    """``gated`` (the flat ``If`` chain of :mod:`qmpass.rewrite.gated_switch`) with its
    branches nested as that module first wrote them: ``If(level < s_1) { branch 0 } else
    { If(level < s_2) { branch 1 } else { ... } }``, the shared weights still in the main
    graph (so read two or more scopes up by every branch but the first)."""
    ifs = [n for n in gated.graph.node if n.op_type == "If"]
    starts = [int(n.name.rsplit("If", 1)[1]) for n in ifs]
    branches = [next(a.g for a in n.attribute if a.name == "then_branch") for n in ifs]
    count = len(numpy_helper.to_array(next(t for t in gated.graph.initializer
                                           if t.name == f"{GATED_INPUT}/branches")))
    records = list(gated.graph.output)
    checked, tables = f"{GATED_INPUT}/checked", []
    chain: onnx.GraphProto | None = None
    nodes: list[onnx.NodeProto] = []
    for j in range(len(branches) - 1, 0, -1):
        bound = numpy_helper.from_array(np.array(starts[j]), f"{GATED_INPUT}/below{starts[j]}")
        tables.append(bound)
        names = [r.name if j == 1 else f"nested{j}/{r.name}" for r in records]
        pair = [helper.make_node("Less", [checked, bound.name], [f"{bound.name}/taken"]),
                helper.make_node("If", [f"{bound.name}/taken"], names, f"nested/If{j}",
                                 then_branch=branches[j - 1],
                                 else_branch=chain or branches[j])]
        if j == 1:
            nodes = pair
        else:
            outs = [helper.make_tensor_value_info(n, r.type.tensor_type.elem_type, None)
                    for n, r in zip(names, records, strict=True)]
            chain = helper.make_graph(pair, f"nested{j}", [], outs)
    levels = numpy_helper.from_array(np.arange(count), f"{GATED_INPUT}/levels")
    nodes.insert(0, helper.make_node("Gather", [levels.name, GATED_INPUT], [checked], axis=0))
    flat_tables = {f"{GATED_INPUT}/branches"} | {t.name for t in gated.graph.initializer
                                                 if t.name.startswith(f"{GATED_INPUT}/empty")
                                                 or t.name.startswith(f"{GATED_INPUT}/is")}
    out = onnx.ModelProto()
    out.CopyFrom(gated)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    kept = [t for t in gated.graph.initializer if t.name not in flat_tables]
    del out.graph.initializer[:]
    out.graph.initializer.extend([*kept, levels, *tables])
    return out


def table(folder: Path, timings: Timings, size: str = "small", reuse: bool = False,
          rounds: int = ROUNDS) -> None:
    """The level table of ``folder``'s ``llama_<size>.onnx`` (module docstring), timed
    by ``timings`` (bench/gated.py's interleaved rounds). The compressed models are
    written to ``folder/gated_bench``; ``reuse``: time and measure the ones there instead
    of compressing again."""
    started = time.perf_counter()
    path = folder / f"llama_{size}.onnx"
    calib = dict(np.load(folder / f"llama_{size}_calib.npz"))
    original = onnx.load(str(path))
    vocab = next(t for t in original.graph.initializer if t.name == "embed_tokens").dims[0]
    ids = calib["input_ids"]
    test = {"input_ids": np.random.default_rng(2).integers(0, vocab, (16, ids.shape[1]))}
    reference = run_model(original, test)
    kept = folder / "gated_bench"
    if not reuse:
        gated, report = compress_gated(original, CompressConfig(budgets=BUDGETS, calib=calib),
                                       standalone=False)
        levels = report.to_dict()["levels"]
        alone = {row["level"]: original if row["budget"] >= 1 else
                 compress(original, CompressConfig(keep=row["budget"], calib=calib))[0]
                 for row in levels}
        kept.mkdir(exist_ok=True)
        for stale in kept.iterdir():  # onnx.save appends to an external data file
            stale.unlink()
        (kept / "levels.json").write_text(json.dumps(levels))
        for name, model in [("gated", gated), *((f"standalone{k}", m)
                                                for k, m in alone.items() if k)]:
            onnx.save(model, str(kept / f"{name}.onnx"), save_as_external_data=True,
                      location=f"{name}.onnx.data")
    # read back (saving with external data turned the protos in memory into references
    # to files relative to the working directory)
    gated = onnx.load(str(kept / "gated.onnx"))
    levels = json.loads((kept / "levels.json").read_text())
    alone = {row["level"]: original if row["budget"] >= 1 else
             onnx.load(str(kept / f"standalone{row['level']}.onnx")) for row in levels}
    nested = nested_form(gated)
    compressed = time.perf_counter() - started
    errors = []
    for row in levels:
        feeds = {**test, GATED_INPUT: np.array(row['level'])}
        gated_error = compare(reference, run_model(gated, feeds), 16).relative_error
        nested_error = compare(reference, run_model(nested, feeds), 16).relative_error
        alone_error = compare(reference, run_model(alone[row["level"]], test),
                              16).relative_error
        errors.append((gated_error, nested_error, alone_error))
    timed = {}
    for batch in (1, 4):
        runs = {}
        for k in alone:
            feeds = {**test, GATED_INPUT: np.array(k)}
            runs[("gated", k)] = (gated, feeds)
            runs[("nested", k)] = (nested, feeds)
            runs[("alone", k)] = (alone[k], test)
        timed[batch] = timings(runs, batch, rounds, repeat=1,
                                clocks=(time.perf_counter, time.thread_time))
    print(f"\n### llama_{size} ({stored_params(original):,} parameters, random weights): "
          f"budgets {', '.join(f'{b:g}' for b in BUDGETS)}\n")
    print(f"stored parameters: gated (written) {stored_params(gated):,}, nested (before) "
          f"{stored_params(nested):,}, the standalone models together "
          f"{sum(stored_params(m) for m in alone.values()):,}, the original "
          f"{stored_params(original):,}; ranks per level: "
          + "; ".join(f"level {level['level']}: {level['ranks'] or 'none'}"
                      for level in levels) + "\n")
    print("| level | budget | params in use | error gated | error nested (before) | "
          "error standalone | gated - standalone |\n|---:|---:|---:|---:|---:|---:|---:|")
    for row, (g, n, a) in zip(levels, errors, strict=True):
        print(f"| {row['level']} | {row['budget']:g} | {row['operator_params']:,} | {g:.4f} | "
              f"{n:.4f} | "
              f"{a:.4f} | {g - a:+.4f} |")
    for clock, name in enumerate(("wall", "CPU (thread time)")):
        print(f"\nms, {name}, median of {rounds} interleaved rounds:\n")
        print("| level | " + " | ".join(f"{who}, {b} seq" for b in (1, 4) for who in
                                          ("gated", "nested (before)", "standalone",
                                           "gated / standalone"))
              + " |\n|---:|" + "---:|" * 8)
        for k in alone:
            cells = []
            for b in (1, 4):
                t = timed[b][clock]
                cells += [f"{t[(who, k)]:.2f}" for who in ("gated", "nested", "alone")]
                cells.append(f"{t[('gated', k)] / t[('alone', k)]:.2f}x")
            print(f"| {k} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n({compressed:.0f} s compressing, {time.perf_counter() - started:.0f} s in all)")



def scopes(timings: Timings, rounds: int = 41) -> None:
    """Where a branch's weight is stored, timed (module docstring)."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(1024, 1024)).astype(np.float32)
    x = rng.normal(size=(64, 1024)).astype(np.float32)

    def record(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [64, 1024])

    def leaf(name: str, w: str, own: bool = False) -> onnx.GraphProto:
        inits = [numpy_helper.from_array(weight, w)] if own else []
        return helper.make_graph([helper.make_node("MatMul", ["x", w], [f"{name}_y"])],
                                 name, [], [record(f"{name}_y")], inits)

    def model(branch: onnx.GraphProto, outer: bool) -> onnx.ModelProto:
        """``If(c) { branch } else { x @ identity }``, ``W`` in the main graph if
        ``outer``."""
        eye = numpy_helper.from_array(np.eye(1024, dtype=np.float32), "eye")
        inits = [eye, numpy_helper.from_array(weight, "W")] if outer else [eye]
        graph = helper.make_graph(
            [helper.make_node("If", ["c"], ["y"], then_branch=branch,
                              else_branch=leaf("other", "eye"))], "probe",
            [record("x"), helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
            [record("y")], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                 ir_version=8)

    def nested(own: bool) -> onnx.GraphProto:
        """A branch that is an ``If`` on ``c`` again, both its branches reading ``W``
        (stored in this branch if ``own``)."""
        inits = [numpy_helper.from_array(weight, "W")] if own else []
        return helper.make_graph([helper.make_node("If", ["c"], ["m_y"],
                                                   then_branch=leaf("a", "W"),
                                                   else_branch=leaf("b", "W"))],
                                 "middle", [], [record("m_y")], inits)

    forms = {"in the branch": model(leaf("t", "W", own=True), outer=False),
             "one scope up": model(leaf("t", "W"), outer=True),
             "two scopes up (the nested form's shared weights)": model(nested(False), True),
             "one scope up, in a nested branch": model(nested(True), outer=False)}
    runs = {k: (m, {"x": x, "c": np.array(True)}) for k, m in forms.items()}
    unpacked = forms["in the branch"]
    runs["in the branch, pre-packing off"] = (unpacked, runs["in the branch"][1])
    times = timings(runs, None, rounds, 8, (time.perf_counter,),
                    {"in the branch, pre-packing off"})[0]
    print("\n### where a branch's MatMul weight is stored: ms of one 64 x 1024 by 1024 x "
          f"1024 MatMul in an If, median of {rounds} interleaved rounds\n")
    print("| weight stored | ms | / in the branch |\n|---|---:|---:|")
    for key, ms in times.items():
        print(f"| {key} | {ms:.3f} | {ms / times['in the branch']:.2f}x |")
