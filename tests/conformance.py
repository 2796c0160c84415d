"""The conformance suite over ONNX's own backend test data (shared by the test and the bench).

Every case is a model with inputs and expected outputs, as the installed ``onnx`` wheel
ships them (``onnx/backend/test/data/{pytorch-converted,pytorch-operator,simple,light}``)
or as onnx's own node test-case generators write them (``onnx.backend.test.case.node``).
The Gemm/Conv/ConvTranspose/MatMul node cases are also taken with their weight inputs
made initializers (``<case>_const``), so that rewrites have something to act on.

Each case goes through the command line, in process (``qmpass.cli.main``):

* ``analyze`` with a JSON report;
* a near-lossless ``compress --delta 1e-6 --tolerance 1e-3`` calibrated on the case's own
  inputs, whose output must reproduce the expected outputs within the backend tests'
  own tolerances (rtol 1e-3, atol 1e-7);
* a lossy ``compress --keep 0.5`` on the same inputs;
* ``lower --target cpu`` where the model has a weight operator (optional: it compiles).

Checks: no command exits 1 (an exception escaping ``main`` is a crash); every model
written passes ``onnx.checker`` (full), keeps the caller's interface (the graph inputs
that are not initializers, and the outputs) and loads in onnxruntime; exit 2 leaves no
file behind; a model onnxruntime itself cannot run is refused with exit 2.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
DIRECTORIES = ("pytorch-converted", "pytorch-operator", "simple", "light")
#: node cases whose weight inputs are made constant, so that rewrites run
WEIGHT_OPS = {"Gemm": (1, 2), "Conv": (1, 2), "ConvTranspose": (1, 2), "MatMul": (1,)}
RTOL, ATOL = 1e-3, 1e-7  # the backend tests' own (onnx/backend/test/data/real/*/data.json)


@dataclass
class Case:
    """One model with its input sets and expected outputs (by graph input/output order)."""

    name: str
    kind: str
    load: Callable[[], onnx.ModelProto]
    datasets: Callable[[], list[tuple[list[np.ndarray], list[np.ndarray]]]]


@dataclass
class Outcome:
    """What one command did on one case."""

    command: str
    code: int
    message: str = ""
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


# -- the cases ---------------------------------------------------------------------------
def file_cases() -> list[Case]:
    """The model directories of the installed onnx wheel."""
    cases: list[Case] = []
    for kind in DIRECTORIES[:3]:
        for folder in sorted((DATA / kind).iterdir()):
            if (folder / "model.onnx").is_file():
                cases.append(Case(folder.name, kind, _loader(folder / "model.onnx"),
                                  _folder_datasets(folder)))
    for path in sorted((DATA / "light").glob("light_*.onnx")):
        cases.append(Case(path.stem, "light", _loader(path), _light_datasets(path)))
    return cases


def node_cases() -> list[Case]:
    """onnx's node test cases as its generators write them, and the weight-op ones with
    constant weights."""
    import warnings

    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        generated = collect_testcases(None)
    cases: list[Case] = []
    for test in generated:
        if test.model is None or not test.data_sets:
            continue
        model, data = test.model, [(list(i), list(o)) for i, o in test.data_sets]
        cases.append(Case(test.name, "node", lambda m=model: m, lambda d=data: d))
        op_types = {n.op_type for n in model.graph.node}
        if len(model.graph.node) == 1 and op_types & set(WEIGHT_OPS):
            const = _weights_constant(model, data[0][0])
            if const is not None:
                cases.append(Case(test.name + "_const", "node-const", lambda m=const: m,
                                  lambda d=data, m=const, o=model: _drop_fed(d, o, m)))
    return cases


def all_cases() -> list[Case]:
    return file_cases() + node_cases()


def _loader(path: Path) -> Callable[[], onnx.ModelProto]:
    return lambda: onnx.load(str(path))


def _folder_datasets(folder: Path) -> Callable[[], list[tuple[list[np.ndarray], list[np.ndarray]]]]:
    def read() -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
        sets = []
        for data in sorted(folder.glob("test_data_set_*")):
            inputs = [_read_pb(p) for p in sorted(data.glob("input_*.pb"), key=_index)]
            outputs = [_read_pb(p) for p in sorted(data.glob("output_*.pb"), key=_index)]
            sets.append((inputs, outputs))
        return sets
    return read


def _light_datasets(path: Path) -> Callable[[], list[tuple[list[np.ndarray], list[np.ndarray]]]]:
    """The light models' inputs as onnx's runner makes them (``arange / n``), and their
    committed expected outputs."""
    def read() -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
        model = onnx.load(str(path), load_external_data=False)
        stored = {i.name for i in model.graph.initializer}
        inputs = []
        for value in model.graph.input:
            if value.name in stored:
                continue
            dims = value.type.tensor_type.shape.dim
            shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in dims)
            n = int(np.prod(shape))
            inputs.append((np.arange(n).reshape(shape) / n).astype(np.float32))
        outputs = [_read_pb(p) for p in sorted(path.parent.glob(f"{path.stem}_output_*.pb"),
                                                 key=_index)]
        return [(inputs, outputs)]
    return read


def _index(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])


def _read_pb(path: Path) -> Any:
    tensor = onnx.TensorProto()
    tensor.ParseFromString(path.read_bytes())
    if tensor.data_type or tensor.dims:
        return numpy_helper.to_array(tensor)
    sequence = onnx.SequenceProto()  # the sequence cases store their values as sequences
    sequence.ParseFromString(path.read_bytes())
    return [numpy_helper.to_array(t) for t in sequence.tensor_values]


def _weights_constant(model: onnx.ModelProto, inputs: list[np.ndarray]) -> onnx.ModelProto | None:
    node = model.graph.node[0]
    positions = [p for p in WEIGHT_OPS[node.op_type] if p < len(node.input) and node.input[p]]
    graph_inputs = [v.name for v in model.graph.input]
    made = onnx.ModelProto()
    made.CopyFrom(model)
    moved = False
    for position in positions:
        name = node.input[position]
        if name not in graph_inputs:
            continue
        array = inputs[graph_inputs.index(name)]
        if not isinstance(array, np.ndarray) or array.dtype.kind != "f":
            continue
        made.graph.initializer.append(numpy_helper.from_array(array, name))
        kept = [v for v in made.graph.input if v.name != name]
        del made.graph.input[:]
        made.graph.input.extend(kept)
        moved = True
    return made if moved else None


def _drop_fed(
    data: list[tuple[list[np.ndarray], list[np.ndarray]]],
    original: onnx.ModelProto,
    const: onnx.ModelProto,
) -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
    """The datasets of the original node case for the inputs ``const`` still has (only
    the first set fixes the weights, so only it is kept)."""
    keep = {v.name for v in const.graph.input}
    names = [v.name for v in original.graph.input]
    inputs, outputs = data[0]
    return [([a for n, a in zip(names, inputs, strict=True) if n in keep], outputs)]


# -- running ----------------------------------------------------------------------------
def run_cli(argv: list[str]) -> tuple[int, str]:
    """``qmpass.cli.main(argv)`` in process: the exit code (1 for an escaping exception,
    the message then being its traceback) and what it wrote on stderr."""
    from qmpass.cli import main

    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)
    except SystemExit as exc:
        code = int(exc.code) if isinstance(exc.code, int) else 2
    except Exception:
        return 1, traceback.format_exc()
    return code, err.getvalue()


def interface(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """What a caller sees: the inputs it must feed (not initializers) and the outputs."""
    stored = {t.name for t in model.graph.initializer}
    return ([v.SerializeToString().hex() for v in model.graph.input if v.name not in stored],
            [v.SerializeToString().hex() for v in model.graph.output])


def ort_outputs(model: onnx.ModelProto | str, feeds: dict[str, Any]) -> list[Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def feeds_of(model: onnx.ModelProto, inputs: list[Any]) -> dict[str, Any]:
    stored = {t.name for t in model.graph.initializer}
    names = [v.name for v in model.graph.input if v.name not in stored]
    return {name: _value(x) for name, x in zip(names, inputs, strict=False)}


def _value(x: Any) -> Any:
    """A dataset value as onnxruntime takes it: arrays (not numpy scalars or protos)."""
    if isinstance(x, onnx.TensorProto):
        return numpy_helper.to_array(x)
    if isinstance(x, list):
        return [_value(v) for v in x]
    return x if isinstance(x, dict) else np.asarray(x)


def _matches(actual: list[Any], expected: list[Any]) -> str | None:
    for i, (a, e) in enumerate(zip(actual, expected, strict=False)):
        if isinstance(e, list):
            if not isinstance(a, list) or len(a) != len(e):
                return f"output {i}: sequence differs"
            problem = _matches(a, e)
            if problem:
                return problem
            continue
        a, e = np.asarray(a), np.asarray(e)
        if a.shape != e.shape:
            return f"output {i}: shape {a.shape} != expected {e.shape}"
        if e.dtype.kind in "fc":
            if not np.allclose(a, e, rtol=RTOL, atol=ATOL, equal_nan=True):
                err = float(np.max(np.abs(a.astype(np.float64) - e.astype(np.float64))))
                return f"output {i}: max abs error {err:.3g} beyond rtol {RTOL}, atol {ATOL}"
        elif not np.array_equal(a, e):
            return f"output {i}: values differ"
    return None


def _calib_file(model: onnx.ModelProto, datasets: list, folder: Path) -> Path | None:
    """The case's inputs as a ``--calib`` file (the first set; tensors only)."""
    if not datasets:
        return None
    feeds = feeds_of(model, datasets[0][0])
    if not feeds or any(not isinstance(a, np.ndarray) for a in feeds.values()):
        return None
    path = folder / "calib.npz"
    np.savez(path, **feeds)
    return path


def check_output(path: Path, original: onnx.ModelProto) -> list[str]:
    """Why the model written at ``path`` is not a valid rewrite of ``original``."""
    problems: list[str] = []
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # the checker's own exception types vary
        return [f"onnx.checker: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"]
    if interface(model) != interface(original):
        problems.append("interface changed")
    try:
        _loads(path)
    except Exception as exc:
        problems.append(f"onnxruntime cannot load it: {str(exc).splitlines()[0]}")
    return problems


def _loads(path: Path) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_can_run(model: onnx.ModelProto, datasets: list) -> str | None:
    """``None`` when onnxruntime runs ``model`` on the case's first input set, else why not."""
    try:
        ort_outputs(model, feeds_of(model, datasets[0][0]) if datasets else {})
    except Exception as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def run_case(case: Case, workdir: Path, lower: bool = False) -> list[Outcome]:
    """Every command of the suite on ``case`` (see the module docstring)."""
    folder = workdir / case.name
    folder.mkdir(parents=True, exist_ok=True)
    original = case.load()
    model_path = folder / "model.onnx"
    onnx.save(original, str(model_path))
    datasets = case.datasets()
    calib = _calib_file(original, datasets, folder)
    runnable = ort_can_run(original, datasets)
    calib_args = [] if calib is None else ["--calib", str(calib)]
    outcomes: list[Outcome] = []

    def command(name: str, argv: list[str], written: list[Path]) -> Outcome:
        start = time.perf_counter()
        code, message = run_cli(argv)
        outcome = Outcome(name, code, message.strip(), seconds=time.perf_counter() - start)
        if code == 2:
            if len(message.strip().splitlines()) != 1:
                outcome.problems.append("exit 2 without exactly one line on stderr")
            outcome.problems += [f"exit 2 left {p.name} behind" for p in written if p.exists()]
        if code == 0 and runnable is not None and name != "analyze":
            outcome.problems.append(f"onnxruntime cannot run the input ({runnable}), "
                                    "yet it was not refused")
        outcomes.append(outcome)
        return outcome

    report = folder / "analysis.json"
    command("analyze", ["analyze", str(model_path), "--report", str(report)], [report])

    near = folder / "near.onnx"
    done = command("compress-near", ["compress", str(model_path), "-o", str(near), "--delta",
                                     "1e-6", "--tolerance", "1e-3", *calib_args], [near])
    if done.code == 0:
        done.problems += check_output(near, original)
        if not done.problems and datasets:
            for inputs, expected in datasets:
                feeds = feeds_of(original, inputs)
                try:
                    got = ort_outputs(str(near), feeds)
                except Exception as exc:
                    done.problems.append(f"onnxruntime cannot run the output: {exc}")
                    break
                # onnxruntime itself differs from some expected outputs (resize, DFT...):
                # there the reference is what it computes for the original model
                own = ort_outputs(original, feeds)
                if _matches(own, [_value(e) for e in expected]) is not None:
                    expected = own
                    done.message = "onnxruntime differs from the expected outputs"
                mismatch = _matches(got, [_value(e) for e in expected])
                if mismatch:
                    done.problems.append(f"near-lossless output mismatch: {mismatch}")
                    break

    lossy = folder / "lossy.onnx"
    done = command("compress-keep", ["compress", str(model_path), "-o", str(lossy), "--keep",
                                     "0.5", *calib_args], [lossy])
    if done.code == 0:
        done.problems += check_output(lossy, original)

    if lower and report.exists() and json.loads(report.read_text())["operators"]:
        target = folder / "lowered"
        command("lower", ["lower", str(model_path), "--target", "cpu", "-o", str(target),
                          *calib_args], [target])
    return outcomes


def failures(outcomes: list[Outcome]) -> list[str]:
    """Each crash (exit 1 or an unexpected code) and each broken check, as a line."""
    lines = []
    for o in outcomes:
        if o.code not in (0, 2):
            lines.append(f"{o.command}: exit {o.code}: {o.message.strip().splitlines()[-1:]}")
        lines += [f"{o.command}: {p}" for p in o.problems]
    return lines


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="qmpass-conformance-") as folder:
        yield Path(folder)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":  # one case, as the bench runs it in a child process
    import sys

    wanted, lower_flag = sys.argv[1], "--lower" in sys.argv
    found = [c for c in (node_cases() if "--node" in sys.argv else file_cases())
             if c.name == wanted]
    with scratch() as work:
        start = time.perf_counter()
        results = run_case(found[0], work, lower=lower_flag)
        print(json.dumps({
            "case": wanted, "kind": found[0].kind, "seconds": time.perf_counter() - start,
            "peak_rss_mb": peak_rss_mb(),
            "outcomes": [o.__dict__ for o in results],
        }))
    os._exit(0)
