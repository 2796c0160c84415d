"""Compile emitted kernels with the system C++ compiler and run them on the CPU.

The harness is one translation unit: the target's simulation header, every kernel's
source, and a ``main`` that loads the global-memory arguments (float32 files converted to
each argument's dtype), runs the launches in order (each on every simulated core, see
:meth:`hw_targets.base.TargetModule.launch`), stores the outputs, and prints one JSON
line of cycle counters per kernel. A fault of the simulation (exit status 3: an on-chip
buffer overflow, an access outside a global argument, or a race between asynchronous
engines, see ``qmsim::Tracker``) becomes :class:`SimulationFault`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hw_targets.base import KernelSource, Target, TargetModule

__all__ = [
    "INCLUDE_DIR",
    "Argument",
    "CompileError",
    "Launch",
    "SimResult",
    "SimulationFault",
    "compiler",
    "harness_source",
    "run",
]

INCLUDE_DIR = Path(__file__).resolve().parent / "include"
CXXFLAGS = ("-std=c++17", "-O2", "-Wall", "-Wno-unused-variable", "-Wno-unused-function")


class CompileError(RuntimeError):
    """The emitted source did not compile (a bug in an emitter, never in user input)."""


class SimulationFault(RuntimeError):
    """The simulated kernel overflowed an on-chip buffer, left its global arguments, or
    raced: an engine used a buffer before the synchronisation point that orders it after
    another engine's copy or instruction."""


@dataclass(frozen=True)
class Argument:
    """A global-memory argument: dtype ``half`` or ``float``, size in elements."""

    name: str
    dtype: str
    count: int


@dataclass(frozen=True)
class Launch:
    """Run ``kernel`` with these global arguments (names of :class:`Argument`)."""

    kernel: KernelSource
    args: tuple[str, ...]


@dataclass(frozen=True)
class SimResult:
    outputs: dict[str, np.ndarray]
    counters: list[dict[str, object]]


def compiler() -> str:
    """The C++ compiler: ``$CXX``, else g++, else clang++."""
    for name in (os.environ.get("CXX"), "g++", "clang++"):
        if name and shutil.which(name):
            return name
    raise CompileError("no C++ compiler found (set CXX, or install g++)")


def harness_source(
    module: TargetModule,
    target: Target,
    arguments: Sequence[Argument],
    launches: Sequence[Launch],
    inputs: Sequence[str],
    outputs: Sequence[str],
    include_kernels: bool = False,
) -> str:
    """The C++ ``main`` around the kernels (also written by ``qmpass lower``).

    Run as ``./sim DIR``: it reads ``DIR/<input>.bin`` (float32) and writes
    ``DIR/<output>.out`` (float32); without ``DIR`` it runs on zeros and only reports
    cycles. With ``include_kernels`` the kernels are ``#include``d from
    ``kernels/<name>.cc`` instead of pasted in (the layout ``qmpass lower`` writes).
    """
    ctype = {"half": "qmsim::half", "float": "float"}
    lines = [f"#define QM_{name.upper()} {value}" for name, value in module.defines(target).items()]
    lines += [f'#include "{module.HEADER}"', ""]
    seen: set[str] = set()
    for launch in launches:
        if launch.kernel.name not in seen:
            seen.add(launch.kernel.name)
            if include_kernels:
                lines.append(f'#include "kernels/{launch.kernel.name}.cc"')
            else:
                lines += [launch.kernel.code, ""]
    lines += ["int main(int argc, char** argv) {", '  std::string dir = argc > 1 ? argv[1] : ".";']
    for arg in arguments:
        lines.append(
            f'  qmsim::GlobalArg<{ctype[arg.dtype]}> {arg.name}("{arg.name}", {arg.count});'
        )
    for arg in arguments:
        if arg.name in inputs:
            lines.append(f"  if (argc > 1) {arg.name}.load(dir);")
    for launch in launches:
        pointers = tuple(f"{name}.ptr()" for name in launch.args)
        lines.append("  {")
        statements = module.launch(launch.kernel, pointers, target)
        lines.append("    " + statements.replace("\n", "\n    "))
        lines.append(f'    qmsim::report_kernel("{launch.kernel.name}");')
        lines.append("  }")
    for name in outputs:
        lines.append(f"  if (argc > 1) {name}.store(dir);")
    lines += ["  return 0;", "}", ""]
    return "\n".join(lines)


def build(source: str, workdir: Path) -> Path:
    """Compile ``source`` to an executable in ``workdir`` (cached by content)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    exe = workdir / f"sim_{digest}"
    if exe.exists():
        return exe
    src = workdir / f"sim_{digest}.cc"
    src.write_text(source)
    cmd = [compiler(), *CXXFLAGS, "-I", str(INCLUDE_DIR), str(src), "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise CompileError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    return exe


def run(
    module: TargetModule,
    target: Target,
    arguments: Sequence[Argument],
    launches: Sequence[Launch],
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    workdir: Path | None = None,
) -> SimResult:
    """Compile and run the launches on ``inputs``; return outputs and cycle counters."""
    source = harness_source(module, target, arguments, launches, tuple(inputs), outputs)
    with tempfile.TemporaryDirectory(prefix="qmsim-") as tmp:
        work = Path(workdir) if workdir is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        exe = build(source, work)
        data = Path(tmp) / "data"
        data.mkdir()
        counts = {a.name: a.count for a in arguments}
        for name, value in inputs.items():
            flat = np.ascontiguousarray(value, dtype=np.float32).ravel()
            if flat.size != counts[name]:
                raise ValueError(f"input {name!r} has {flat.size} values, expected {counts[name]}")
            flat.tofile(data / f"{name}.bin")
        done = subprocess.run([str(exe), str(data)], capture_output=True, text=True)
        if done.returncode == 3:
            raise SimulationFault(done.stderr.strip().splitlines()[-1])
        if done.returncode != 0:
            raise RuntimeError(f"simulation exited {done.returncode}: {done.stderr[-2000:]}")
        result = {
            name: np.fromfile(data / f"{name}.out", dtype=np.float32) for name in outputs
        }
    counters = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return SimResult(result, counters)
