"""Serial vs ``jobs=2`` threads vs a Dask ``LocalCluster`` for ``analyze`` and ``compress``.

Models: the trained fixtures in ``models/`` and a larger chain of ``--layers`` MatMul+Relu
of ``--width`` x ``--width`` built here with *random* weights, saved to a temporary file
(random matrices are for timing only: they say nothing about compressibility). compress
runs ``keep=0.5`` (with the fixture's calibration inputs where there are some; the random
model verifies on synthesised inputs). Times are the best of ``--repeats`` wall-clock runs;
the cluster (2 worker processes, 1 thread each) is started once, outside the timer, and
its first use (each worker loading the model file) is inside it. Every parallel result is
checked equal to the serial one. Run from the repository root: ``python bench/parallel.py``.
On a shared or loaded machine the numbers say little: report the load average with them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import FIXTURES, fixture_path
from qmpass.analysis import AnalysisConfig, analyze
from qmpass.compress import CompressConfig, compress
from qmpass.modelio import load_model
from qmpass.verify import load_calib


def random_chain(width: int, layers: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
    graph = helper.make_graph(
        nodes, "random_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["n", width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def best(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from distributed import LocalCluster

    print(f"cpus: {os.cpu_count()}, load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True,
            dashboard_address=None) as cluster:
        big = Path(tmp) / "random_chain.onnx"
        onnx.save(random_chain(args.width, args.layers), str(big))
        models = [(name, fixture_path(name)) for name in FIXTURES]
        models.append((f"random {args.layers}x{args.width}^2", big))
        runs = {"serial": {}, "jobs=2": {"jobs": 2},
                "LocalCluster(2)": {"scheduler": cluster.scheduler_address}}
        print("| model | step | " + " | ".join(runs) + " |")
        print("|---|---|" + "---|" * len(runs))
        for name, path in models:
            calib_path = path.with_name(path.stem + "_calib.npz")
            calib = (load_calib(calib_path, load_model(path).proto)
                     if calib_path.is_file() else None)
            for step in ("analyze", "compress"):
                cells, reference = [], None
                for kwargs in runs.values():
                    if step == "analyze":
                        seconds, out = best(lambda kw=kwargs, path=path: [  # type: ignore[misc]
                            s.singular_values.tobytes() for s in analyze(
                                path, AnalysisConfig(progress=False, **kw)).states],
                            args.repeats)
                    else:
                        seconds, out = best(lambda kw=kwargs, path=path, calib=calib: compress(  # type: ignore[misc]
                            path, CompressConfig(keep=0.5, calib=calib, **kw))[1].plan,
                            args.repeats)
                    reference = out if reference is None else reference
                    cells.append(f"{seconds:.2f} s" + ("" if out == reference else " DIFFERS"))
                print(f"| {name} | {step} | " + " | ".join(cells) + " |", flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
