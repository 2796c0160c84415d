"""Time and peak resident memory of ``qmpass analyze`` and ``compress`` by model size.

Writes decoder models in the LLaMA layout as opset-17 ONNX with external data (one
``<model>.onnx.data`` file) and runs the CLI on them as child processes, printing for each
command and model the wall-clock time and the child's peak resident set (``ru_maxrss`` of
that child alone: each command runs under its own ``python -c`` wrapper that reports
``resource.getrusage(RUSAGE_CHILDREN)`` after its one child exits), and how both grow
with the weights.

The weights are *random* (normal, std 0.02): these models measure time and memory only;
they say nothing about compressibility or accuracy. The layout: token embedding
(``Gather``), per layer RMSNorm decomposed into standard ops (``Pow``, ``ReduceMean``,
``Add``, ``Sqrt``, ``Div``, ``Mul``), q/k/v/o projections as ``MatMul`` with grouped
key/value heads (``Expand`` to the query heads), causal softmax attention, a SwiGLU MLP
(gate, up, down ``MatMul``; SiLU as ``x * Sigmoid(x)``), residual adds, final RMSNorm and
the LM head ``MatMul``. Rotary position embeddings are left out (they add elementwise ops
on activations, no weights). Sizes:

* ``tiny``: d 256, 2 layers, 4 heads (2 kv), MLP 688, vocabulary 1000;
* ``small``: d 1024, 4 layers, 16 heads (4 kv), MLP 2816, vocabulary 8000;
* ``tinyllama`` (only with ``--big``): the TinyLlama-1.1B layout, 22 layers, d 2048,
  32 heads (4 kv), SwiGLU 5632, vocabulary 32000: 1.1 B parameters, 4.1 GiB of float32.

``compress`` runs ``--keep 0.75 --calib`` with random token ids (``--samples`` sequences
of ``--seq`` tokens). ``--zoo`` adds the light zoo of onnx's backend test data (the
models as the onnx wheel ships them; ``compress --keep 0.5`` without calibration) and the
trained fixtures of ``models/`` (``compress --keep 0.5 --calib``). ``--dask`` also runs
``analyze`` through a 2-worker local Dask cluster (``--scheduler``; the workers' own
memory is not in the peak RSS column, which is the command's process) and says whether
its report equals the serial one. Run from the repository root: ``python bench/scale.py [--big]``.
Check ``free -g`` before ``--big``: the model file alone is 4.4 GB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Layout:
    name: str
    d: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int
    dtype: type[np.floating] = np.float32  # every weight, constant and activation

    @property
    def params(self) -> int:
        head = self.d // self.heads
        per_layer = (2 * self.d * self.d + 2 * self.d * self.kv_heads * head
                     + 3 * self.d * self.mlp + 2 * self.d)
        return 2 * self.vocab * self.d + self.layers * per_layer + self.d


LAYOUTS = {
    "tiny": Layout("tiny", 256, 2, 4, 2, 688, 1000),
    "small": Layout("small", 1024, 4, 16, 4, 2816, 8000),
    "tinyllama": Layout("tinyllama", 2048, 22, 32, 4, 5632, 32000),
    "llama7b": Layout("llama7b", 4096, 32, 32, 32, 11008, 32000, np.float16),
}


class _Writer:
    """Initializers written straight into one external data file (never all in memory)."""

    def __init__(self, data: Path, seed: int, dtype: type[np.floating]) -> None:
        self.dtype = dtype
        self.handle = data.open("wb")
        self.location = data.name
        self.rng = np.random.default_rng(seed)
        self.initializers: list[TensorProto] = []

    def tensor(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array, dtype=self.dtype)
        offset = self.handle.tell()
        self.handle.write(array.tobytes())
        pad = (-self.handle.tell()) % 4096  # page-aligned tensors (memory-mappable)
        self.handle.write(b"\0" * pad)
        tensor = TensorProto(name=name, dims=array.shape,
                             data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)),
                           ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)
        self.initializers.append(tensor)
        return name

    def random(self, name: str, shape: tuple[int, ...]) -> str:
        return self.tensor(name, self.rng.standard_normal(shape, dtype=np.float32) * 0.02)


def llama(layout: Layout, path: Path, seq: int, seed: int = 0) -> None:
    """Write the model to ``path`` and its weights to ``path`` + ``.data``."""
    w = _Writer(path.with_name(path.name + ".data"), seed, layout.dtype)
    real = layout.dtype
    nodes: list[onnx.NodeProto] = []
    consts: list[TensorProto] = []
    head = layout.d // layout.heads
    rep = layout.heads // layout.kv_heads

    def const(name: str, value: np.ndarray) -> str:
        consts.append(onnx.numpy_helper.from_array(value, name))
        return name

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    two, eps = const("two", np.array(2.0, real)), const("eps", np.array(1e-5, real))
    scale = const("scale", np.array(1 / np.sqrt(head), real))
    mask = const("causal", np.triu(np.full((seq, seq), -1e4, real), 1))
    heads_shape = const("heads_shape", np.array([0, 0, layout.heads, head], np.int64))
    kv_shape = const("kv_shape", np.array([0, 0, layout.kv_heads, 1, head], np.int64))
    expand = const("expand", np.array([1, 1, 1, rep, 1], np.int64))
    merge = const("merge", np.array([0, 0, layout.d], np.int64))

    def rmsnorm(x: str, prefix: str) -> str:
        sq = node("Pow", [x, two], f"{prefix}.sq")
        mean = node("ReduceMean", [sq], f"{prefix}.mean", axes=[-1], keepdims=1)
        root = node("Sqrt", [node("Add", [mean, eps], f"{prefix}.eps")], f"{prefix}.rms")
        normed = node("Div", [x, root], f"{prefix}.normed")
        return node("Mul", [normed, w.tensor(f"{prefix}.weight", np.ones(layout.d))],
                    f"{prefix}.out")

    def linear(x: str, name: str, d_in: int, d_out: int) -> str:
        return node("MatMul", [x, w.random(f"{name}.weight", (d_in, d_out))], name)

    def kv_heads(x: str, prefix: str) -> str:
        grouped = node("Reshape", [x, kv_shape], f"{prefix}.grouped")
        wide = node("Expand", [grouped, expand], f"{prefix}.expanded")
        return node("Reshape", [wide, heads_shape], f"{prefix}.heads")

    x = node("Gather", [w.random("embed_tokens", (layout.vocab, layout.d)), "input_ids"],
             "embedded", axis=0)
    for i in range(layout.layers):
        p = f"layers.{i}"
        h = rmsnorm(x, f"{p}.input_norm")
        q = node("Reshape", [linear(h, f"{p}.q_proj", layout.d, layout.d), heads_shape],
                 f"{p}.q_heads")
        kv = layout.kv_heads * head
        k = kv_heads(linear(h, f"{p}.k_proj", layout.d, kv), f"{p}.k")
        v = kv_heads(linear(h, f"{p}.v_proj", layout.d, kv), f"{p}.v")
        qt = node("Transpose", [q], f"{p}.qt", perm=[0, 2, 1, 3])
        kt = node("Transpose", [k], f"{p}.kt", perm=[0, 2, 3, 1])
        vt = node("Transpose", [v], f"{p}.vt", perm=[0, 2, 1, 3])
        scores = node("Mul", [node("MatMul", [qt, kt], f"{p}.qk"), scale], f"{p}.scaled")
        probs = node("Softmax", [node("Add", [scores, mask], f"{p}.masked")], f"{p}.probs",
                     axis=-1)
        attn = node("Transpose", [node("MatMul", [probs, vt], f"{p}.pv")], f"{p}.attn_t",
                    perm=[0, 2, 1, 3])
        attn = node("Reshape", [attn, merge], f"{p}.attn")
        x = node("Add", [x, linear(attn, f"{p}.o_proj", layout.d, layout.d)], f"{p}.res1")
        h = rmsnorm(x, f"{p}.post_norm")
        gate = linear(h, f"{p}.gate_proj", layout.d, layout.mlp)
        silu = node("Mul", [gate, node("Sigmoid", [gate], f"{p}.sigmoid")], f"{p}.silu")
        up = linear(h, f"{p}.up_proj", layout.d, layout.mlp)
        down = linear(node("Mul", [silu, up], f"{p}.swiglu"), f"{p}.down_proj", layout.mlp,
                      layout.d)
        x = node("Add", [x, down], f"{p}.res2")
    logits = linear(rmsnorm(x, "norm"), "lm_head", layout.d, layout.vocab)
    w.handle.close()
    graph = helper.make_graph(
        nodes, f"llama_{layout.name}",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", seq])],
        [helper.make_tensor_value_info(logits, helper.np_dtype_to_tensor_dtype(np.dtype(real)),
                                       ["batch", seq, layout.vocab])],
        [*w.initializers, *consts])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              ir_version=8, producer_name="qmpass bench/scale.py")
    path.write_bytes(model.SerializeToString())


_WRAPPER = """
import resource, subprocess, sys, time, json
start = time.perf_counter()
rc = subprocess.run(sys.argv[1:]).returncode
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"rc": rc, "seconds": seconds, "peak": peak}), file=sys.stderr)
"""


#: the environment the benchmark started with: a local Dask cluster sets its workers'
#: thread counts (``OPENBLAS_NUM_THREADS=1``, ...) in this process's environment too,
#: and a serial run measured after it would inherit them
_ENVIRONMENT = dict(os.environ)


def measure(args: list[str], log: Path) -> dict[str, float]:
    """Run ``qmpass args`` as a child, in the environment the benchmark started with; its
    exit code, seconds and peak RSS (bytes)."""
    command = [sys.executable, "-c", _WRAPPER, sys.executable, "-m", "qmpass", *args]
    with log.open("w") as out:
        done = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.PIPE,
                              text=True, check=False, env=_ENVIRONMENT)
    lines = done.stderr.strip().splitlines() or [""]
    with log.open("a") as out:
        out.write("\n".join(lines[:-1]))
    if not lines[-1].startswith("{"):  # the wrapper itself was killed
        return {"rc": done.returncode, "seconds": float("nan"), "peak": float("nan")}
    result: dict[str, float] = json.loads(lines[-1])
    return result


def profile(args: list[str], every: float = 0.2) -> list[tuple[str, float, float]]:
    """Run ``qmpass args`` in this process while a thread samples the resident set and
    the innermost ``qmpass`` frame of the main thread; per frame, the largest resident set
    and the seconds it was seen (where memory and time go, without tracemalloc's cost)."""
    import threading

    sys.path.insert(0, str(ROOT))
    from qmpass.cli import main as qmpass_main

    main_id = threading.get_ident()
    peak: dict[str, float] = {}
    seen: dict[str, float] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every):
            frame = sys._current_frames().get(main_id)
            where = "outside qmpass"
            while frame is not None:
                name = frame.f_code.co_filename
                if "/qmpass/" in name:
                    where = (f"{Path(name).relative_to(ROOT)}:{frame.f_code.co_name}"
                             if name.startswith(str(ROOT)) else name)
                    break
                frame = frame.f_back
            rss = _rss()
            peak[where] = max(peak.get(where, 0.0), rss)
            seen[where] = seen.get(where, 0.0) + every

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        qmpass_main(args)
    finally:
        done.set()
        thread.join()
    return sorted(((w, peak[w], seen[w]) for w in peak), key=lambda r: -r[1])


def _rss() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) * 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"],
                        choices=sorted(LAYOUTS))
    parser.add_argument("--big", action="store_true",
                        help="add the TinyLlama-1.1B layout (4.4 GB on disk)")
    parser.add_argument("--commands", nargs="+", default=["analyze", "compress"],
                        choices=["analyze", "compress"])
    parser.add_argument("--seq", type=int, default=16, help="tokens per sequence")
    parser.add_argument("--samples", type=int, default=16, help="calibration sequences")
    parser.add_argument("--dir", type=Path, help="keep the models and logs here")
    parser.add_argument("--zoo", action="store_true",
                        help="also the light zoo of onnx's backend test data "
                        "(compress --keep 0.5, no calibration) and the trained fixtures "
                        "(compress --keep 0.5 --calib)")
    parser.add_argument("--dask", action="store_true",
                        help="also run analyze through a 2-worker local Dask cluster "
                        "(--scheduler) and check that its report is the serial one")
    parser.add_argument("--profile", action="store_true",
                        help="instead: run each command in this process and print, per "
                        "innermost qmpass function, the peak RSS and seconds sampled there")
    options = parser.parse_args()
    sizes = [*options.sizes, *(["tinyllama"] if options.big else [])]
    if "llama7b" in sizes and options.commands != ["analyze"]:
        parser.error("the 7B layout is for analyze only (--commands analyze)")
    with tempfile.TemporaryDirectory(prefix="qmpass-scale-") as tmp, \
            _cluster(options.dask) as scheduler:
        folder = options.dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        print(f"{'model':<18} {'params':>13} {'weights':>9} {'command':<14} {'rc':>3} "
              f"{'seconds':>9} {'peak RSS':>10} {'RSS/weights':>11}")
        for name, model, params, weights, extra in _models(sizes, folder, options):
            for command in options.commands:
                runs: list[tuple[str, list[str]]] = [(command, [])]
                if command == "analyze" and scheduler is not None:
                    runs.append(("analyze dask", ["--scheduler", scheduler]))
                for label, more in runs:
                    stem = f"{name}_{label.replace(' ', '_')}"
                    args = [command, str(model), *more] if command == "analyze" else [
                        command, str(model), "-o", str(folder / f"{name}_c.onnx"), *extra]
                    if command == "analyze":
                        args += ["--report", str(folder / f"{stem}.json")]
                    log = folder / f"{stem}.log"
                    if options.profile:
                        print(f"{name} {label}: peak RSS and seconds by innermost qmpass "
                              "frame")
                        for where, rss, seconds in profile(args)[:12]:
                            print(f"  {rss / 2**30:7.2f}Gi {seconds:8.1f}s  {where}",
                                  flush=True)
                        continue
                    result = measure(args, log)
                    rows.append((name, label, params, weights, result))
                    print(f"{name:<18} {params:>13,} {weights / 2**30:>7.2f}Gi "
                          f"{label:<14} {result['rc']:>3} {result['seconds']:>9.1f} "
                          f"{result['peak'] / 2**30:>8.2f}Gi "
                          f"{result['peak'] / weights:>11.2f}", flush=True)
                    if result["rc"] != 0:
                        print(f"  (exit {result['rc']}: see {log})", flush=True)
                if scheduler is not None and len(runs) > 1 and not options.profile:
                    same = _same_analysis(folder / f"{name}_analyze.json",
                                          folder / f"{name}_analyze_dask.json")
                    print(f"  dask report {'==' if same else '!='} serial report "
                          "(all but seconds); the workers' peak RSS so far: "
                          + ", ".join(f"{p / 2**30:.2f}Gi" for p in _workers_peak(scheduler)),
                          flush=True)
        _growth([r for r in rows if r[0].removeprefix("llama_") in LAYOUTS])


def _models(sizes: list[str], folder: Path, options: argparse.Namespace
            ) -> Iterator[tuple[str, Path, int, int, list[str]]]:
    """Per model: its name, file, parameters, bytes of weights and compress's budget
    arguments."""
    for size in sizes:
        layout = LAYOUTS[size]
        model = folder / f"llama_{size}.onnx"
        if not model.exists():
            llama(layout, model, options.seq)
        ids = np.random.default_rng(1).integers(0, layout.vocab, (options.samples, options.seq))
        calib = folder / f"llama_{size}_calib.npz"
        np.savez(calib, input_ids=ids.astype(np.int64))
        yield (f"llama_{size}", model, layout.params,
               layout.params * np.dtype(layout.dtype).itemsize,
               ["--keep", "0.75", "--calib", str(calib)])
    if not options.zoo:
        return
    sys.path.insert(0, str(ROOT))
    import models
    from qmpass.extract import extract_operators

    light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    for path in sorted(light.glob("light_*.onnx")):
        params = sum(op.params for op in extract_operators(onnx.load(str(path))).operators)
        yield path.stem, path, params, 4 * params, ["--keep", "0.5"]
    for name in models.FIXTURES:
        path = models.fixture_path(name)
        params = sum(op.params for op in extract_operators(onnx.load(str(path))).operators)
        calib = path.with_name(f"{name}_calib.npz")
        yield name, path, params, 4 * params, ["--keep", "0.5", "--calib", str(calib)]


@contextlib.contextmanager
def _cluster(wanted: bool) -> Iterator[str | None]:
    """A 2-worker local Dask cluster (one thread each) for ``--dask``, else None."""
    if not wanted:
        yield None
        return
    import distributed

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def _workers_peak(scheduler: str) -> list[int]:
    """Each Dask worker's peak resident bytes since the cluster started (the command's
    own peak is the client's only)."""
    import resource

    import distributed

    with distributed.Client(scheduler, timeout=30) as client:
        peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return sorted(peaks.values())


def _same_analysis(serial: Path, dask: Path) -> bool:
    """Whether two ``analyze --report`` reports agree in everything but the seconds."""
    if not serial.is_file() or not dask.is_file():
        return False
    first, second = (json.loads(p.read_text()) for p in (serial, dask))
    for report in (first, second):
        report.pop("seconds", None)
    return bool(first == second)


def _growth(rows: list[tuple[str, str, int, int, dict[str, float]]]) -> None:
    """Per command, how time and peak RSS grow from the smallest model to each larger one."""
    for command in sorted({r[1] for r in rows}):
        mine = [r for r in rows if r[1] == command and r[4]["rc"] == 0]
        for base, other in ((mine[0], other) for other in mine[1:]):
            weights = other[3] / base[3]
            print(f"{command}: {base[0]} -> {other[0]}: weights x{weights:.1f}, time "
                  f"x{other[4]['seconds'] / base[4]['seconds']:.1f}, peak RSS "
                  f"x{other[4]['peak'] / base[4]['peak']:.1f}")


if __name__ == "__main__":
    main()
