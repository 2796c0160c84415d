"""The NPU simulations are asynchronous where the chips are: every synchronisation statement
of the emitted kernels is needed. Each one is deleted in turn (the kernels are compiled
once, with every such statement behind a run-time switch, and run once per deletion) and
the run must stop with exit 3 and one line naming a race; and a lowered fixture's bundle,
with one synchronisation statement deleted from a kernel file, stops on a race when its
``build.sh`` (no Python) reruns it."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import fixture_path

import hw_targets
from hw_targets.base import Param, Tiling
from hw_targets.sim import compiler
from qmpass.lower import LowerConfig, lower

#: A whole-line synchronisation statement of each target's kernels (a trailing comment
#: allowed). An Ascend DeQue that declares its tensor cannot go alone (the code after it
#: needs the name); deleting its EnQue removes that hand-over. A DeQue that re-assigns a
#: tensor (the vector core's) is deleted on its own: the consumer then reads the buffer
#: without waiting for its producer.
_COMMENT = r"\s*(?://.*)?$"
SYNC = {
    "ascend": re.compile(
        r"^(\s*)((?:\w+\.EnQue\(\w+\)|\w+ = \w+\.DeQue<\w+>\(\)|(?:AscendC::)?(?:SetFlag"
        r"|WaitFlag|CrossCoreSetFlag|CrossCoreWaitFlag|PipeBarrier)(?:<[^;]*>)?\([^;]*\));)"
        + _COMMENT),
    "mlu": re.compile(r"^(\s*)(__sync_(?:io|move|compute|cluster)\(\);)" + _COMMENT),
    "kunlunxin": re.compile(r"^(\s*)(mfence\(\);)" + _COMMENT),
}
NPU = sorted(SYNC)

SKIP_HEADER = """#pragma once
#include <cstdlib>
// Test switch: statement number QM_SKIP (environment) is not executed.
inline bool qm_skip(int k) {
  static const int skip = std::getenv("QM_SKIP") ? std::atoi(std::getenv("QM_SKIP")) : -1;
  return k == skip;
}
"""


def _small_target(name: str) -> hw_targets.Target:
    """Two cores, so that each core runs several tiles (its pipeline fills and drains)."""
    target = hw_targets.get_target(name).TARGET
    two = Param(2, "cores", "U", "test: few cores")
    if name == "kunlunxin":
        params = dict(target.params, clusters=Param(1, "clusters", "U", "test"),
                      cores_per_cluster=two)
        return dataclasses.replace(target, cores=two, params=params)
    return dataclasses.replace(target, cores=two)


#: Small tiles of the matmul (40 x 100 x 70) and of the conv's GEMM (4 x 72 x 100): several
#: tiles per core and several k-steps per tile.
TILINGS = {"ascend": (Tiling(32, 32, 32, 2), Tiling(16, 32, 16, 2)),
           "mlu": (Tiling(16, 64, 32, 2), Tiling(16, 64, 48, 1)),
           "kunlunxin": (Tiling(8, 32, 32, 2), Tiling(4, 32, 32, 2))}


def _lowerings(name: str) -> tuple[list[hw_targets.Lowering], list[dict[str, np.ndarray]]]:
    """A matmul with a column bias and a padded conv with a row bias (its im2col and
    GEMM), with forced small tiles and random inputs."""
    module, target = hw_targets.get_target(name), _small_target(name)
    rng = np.random.default_rng(3)
    mm_tiling, conv_tiling = TILINGS[name]
    mm = hw_targets.lower_matmul(module, target, "mm", 40, 100, 70, True)
    mm = dataclasses.replace(mm, tilings=(mm_tiling,))
    conv = hw_targets.lower_conv(module, target, "cv", (1, 8, 10, 10), 4, (3, 3), (1, 1),
                                 (1, 1, 1, 1))
    conv = dataclasses.replace(conv, tilings=(None, conv_tiling))
    feeds = [
        {"a": rng.standard_normal((40, 100)), "b": rng.standard_normal((100, 70)),
         "bias": rng.standard_normal(70)},
        {"a": rng.standard_normal((4, 8, 3, 3)), "x": rng.standard_normal((1, 8, 10, 10)),
         "bias": rng.standard_normal(4)},
    ]
    return [mm, conv], feeds


def _instrument(kernels: Path, pattern: re.Pattern[str]) -> int:
    """Put every synchronisation statement of the kernel files behind ``qm_skip(k)``;
    the number of statements."""
    count = 0
    for path in sorted(kernels.glob("*.cc")):
        lines = []
        for line in path.read_text().splitlines():
            match = pattern.match(line)
            if match:
                line = f"{match[1]}if (!qm_skip({count})) {match[2]}"
                count += 1
            lines.append(line)
        path.write_text('#include "qm_skip.h"\n' + "\n".join(lines) + "\n")
    return count


@pytest.fixture(scope="module", params=NPU)
def instrumented(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, int]:
    """Per target: the bundle of the two operators, instrumented and built once."""
    name = request.param
    out = tmp_path_factory.mktemp(f"races_{name}")
    lowerings, feeds = _lowerings(name)
    hw_targets.write_bundle(lowerings, feeds, out)
    (out / "include" / "qm_skip.h").write_text(SKIP_HEADER)
    count = _instrument(out / "kernels", SYNC[name])
    # -O0: half the compile time of build.sh's -O2, and these runs are small
    subprocess.run([compiler(), "-std=c++17", "-O0", "-I", "include", "sim_main.cc", "-o", "sim"],
                   cwd=out, check=True, capture_output=True)
    done = subprocess.run(["./sim", "data"], cwd=out, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]  # nothing deleted: no race
    return name, out, count


def _run_without(out: Path, k: int) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, QM_SKIP=str(k))
    return subprocess.run([str(out / "sim"), str(out / "data")], capture_output=True,
                          text=True, env=env, cwd=out)


def test_deleting_any_synchronisation_statement_is_a_race(
        instrumented: tuple[str, Path, int]) -> None:
    name, out, count = instrumented
    assert count >= 2, f"{name}: no synchronisation statements found"
    silent = []
    for k in range(count):
        done = _run_without(out, k)
        lines = done.stderr.strip().splitlines()
        if done.returncode != 3 or len(lines) != 1 or "race" not in lines[0]:
            silent.append((k, done.returncode, done.stderr[-300:]))
    assert not silent, f"{name}: deletions not caught as a race: {silent}"


def test_the_outputs_match_with_every_statement_kept(
        instrumented: tuple[str, Path, int]) -> None:
    _, out, _ = instrumented
    outputs = sorted((out / "data").glob("*_c.out"))
    assert len(outputs) == 2
    assert all(np.all(np.isfinite(np.fromfile(p, dtype=np.float32))) for p in outputs)


@pytest.mark.parametrize("name", NPU)
def test_a_lowered_bundle_without_a_sync_stops_on_a_race(name: str, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    lower(fixture_path("mlp_digits"), LowerConfig(name), out)
    pattern = SYNC[name]
    for path in sorted((out / "kernels").glob("*.cc")):
        lines = path.read_text().splitlines()
        hits = [i for i, line in enumerate(lines) if pattern.match(line)]
        if hits:
            del lines[hits[0]]
            path.write_text("\n".join(lines) + "\n")
            break
    else:
        pytest.fail(f"{name}: no synchronisation statement in the bundle")
    env = {"PATH": os.environ["PATH"]}  # build.sh needs a compiler, not Python
    done = subprocess.run(["/bin/sh", str(out / "build.sh")], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 3
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("qmsim: race:"), line
