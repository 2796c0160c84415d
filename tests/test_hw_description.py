"""Every target is its description: ``dataclasses.replace`` of one declared number changes
what the cost model predicts, the constants the simulation header is compiled with, and
(where the number shapes the kernel) the emitted source; and the simulation of a kernel
of the changed target still counts exactly what its cost model predicts."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest

import hw_targets
from hw_targets.base import Param, Target
from hw_targets.sim import harness_source
from hw_targets.spec import GemmSpec, Im2colSpec


def with_param(name: str, value: float) -> Callable[[Target], Target]:
    """The target with ``params[name]`` set to ``value`` (its tag and source kept)."""
    def change(target: Target) -> Target:
        params = dict(target.params)
        params[name] = dataclasses.replace(params[name], value=value)
        return dataclasses.replace(target, params=params)
    return change


def with_buffer(name: str, size: int | None = None,
                align: int | None = None) -> Callable[[Target], Target]:
    """The target with buffer ``name`` resized and/or realigned."""
    def change(target: Target) -> Target:
        old = target.buffer(name)
        new = dataclasses.replace(
            old,
            size=old.size if size is None else dataclasses.replace(old.size, value=size),
            align=old.align if align is None else dataclasses.replace(old.align, value=align),
        )
        buffers = tuple(new if b.name == name else b for b in target.buffers)
        return dataclasses.replace(target, buffers=buffers)
    return change


def with_field(field: str, value: float) -> Callable[[Target], Target]:
    """The target with a top-level number (``cores``, ``dram_bytes_per_cycle``...) changed."""
    def change(target: Target) -> Target:
        old: Param = getattr(target, field)
        return dataclasses.replace(target, **{field: dataclasses.replace(old, value=value)})
    return change


GEMM = GemmSpec("g", 100, 200, 300, bias="col")
IM2COL = Im2colSpec("i", 1, 8, 12, 12, (3, 3), pads=(1, 1, 1, 1))

#: (target, what is changed, the change, whether the predicted cycles must change, whether
#: the emitted GEMM source must change whatever tiling is chosen; the others change it
#: only through the tiling, if at all). Every target has numbers that change both.
OVERRIDES = [
    ("ascend", "cube_edge", with_param("cube_edge", 32), True, True),
    ("ascend", "l2_rate", with_param("l2_rate", 32), True, False),
    ("ascend", "l1_to_l0_a_rate", with_param("l1_to_l0_a_rate", 8), True, False),
    ("ascend", "UB align", with_buffer("UB", align=64), False, True),
    ("ascend", "dram_bytes_per_cycle", with_field("dram_bytes_per_cycle", 400), True, False),
    ("mlu", "sync_cycles", with_param("sync_cycles", 16), True, False),
    ("mlu", "n_align", with_param("n_align", 128), True, True),
    ("mlu", "gdram_unit", with_param("gdram_unit", 128), True, False),
    ("mlu", "NRAM bytes", with_buffer("NRAM", size=64 * 1024), True, True),
    ("kunlunxin", "dma_latency", with_param("dma_latency", 64), True, False),
    ("kunlunxin", "simd_bits", with_param("simd_bits", 256), True, True),
    ("kunlunxin", "LM align", with_buffer("LM", align=32), False, False),
    ("cpu", "lanes", with_param("lanes", 64), True, False),
    ("cpu", "L2 bytes", with_buffer("L2", size=16 * 1024), True, True),
    ("cpu", "dram_bytes_per_cycle", with_field("dram_bytes_per_cycle", 32), True, False),
]


def _predicted(module: hw_targets.TargetModule, target: Target) -> tuple[int, int]:
    gemm = module.cost(GEMM, module.tiling(GEMM, target), target).cycles
    return gemm, module.cost(IM2COL, None, target).cycles


@pytest.mark.parametrize(("name", "what", "change", "cycles", "emits"), OVERRIDES,
                         ids=[f"{n}-{w}" for n, w, *_ in OVERRIDES])
def test_replacing_a_number_changes_cycles_defines_and_code(
    name: str, what: str, change: Callable[[Target], Target], cycles: bool, emits: bool
) -> None:
    module = hw_targets.get_target(name)
    before, after = module.TARGET, change(module.TARGET)
    assert after != before
    if cycles:
        assert _predicted(module, after) != _predicted(module, before), what
    assert module.defines(after) != module.defines(before), what
    codes = [module.emit(GEMM, module.tiling(GEMM, t), t).code for t in (before, after)]
    if emits:
        assert codes[0] != codes[1], what
    # what the harness compiles: the header's #defines and the kernels, from one target
    kernel = module.emit(GEMM, module.tiling(GEMM, before), before)
    launch = hw_targets.sim.Launch(kernel, ("a", "b", "bias", "c"))
    sources = [harness_source(module, t, [], [launch], (), ()) for t in (before, after)]
    assert sources[0] != sources[1]


SIMULATED = [
    ("ascend", with_param("cube_edge", 32)),
    ("mlu", with_param("n_align", 128)),
    ("kunlunxin", with_param("dma_latency", 64)),
    ("cpu", with_param("lanes", 16)),
]


@pytest.mark.parametrize(("name", "change"), SIMULATED, ids=[n for n, _ in SIMULATED])
def test_the_simulation_of_a_changed_target_counts_what_its_model_predicts(
    name: str, change: Callable[[Target], Target]
) -> None:
    module = hw_targets.get_target(name)
    target = change(module.TARGET)
    rng = np.random.default_rng(3)
    lowering = hw_targets.lower_matmul(module, target, "mm", 40, 70, 90, True)
    feeds = {"a": rng.standard_normal((40, 70)).astype(np.float32),
             "b": rng.standard_normal((70, 90)).astype(np.float32),
             "bias": rng.standard_normal(90).astype(np.float32)}
    ((y, counters),) = hw_targets.simulate_all([lowering], [feeds])
    expected = feeds["a"].astype(np.float64) @ feeds["b"] + feeds["bias"]
    assert np.all(np.abs(y - expected) <= lowering.error_bound(feeds) + 1e-6)
    (predicted,) = lowering.costs()
    (counted,) = counters
    assert counted["cycles"] == predicted.cycles
    assert counted["pipes"] == dict(predicted.pipes)


def _reached(module: hw_targets.TargetModule, changed: Target) -> bool:
    """Whether ``changed`` reaches the header or the model (a refusal counts: the number
    was read and checked)."""
    try:
        return (module.defines(changed) != module.defines(module.TARGET)
                or _predicted(module, changed) != _predicted(module, module.TARGET))
    except (ValueError, hw_targets.UnsupportedKernel):
        return True


@pytest.mark.parametrize("name", hw_targets.TARGET_NAMES)
def test_no_declared_number_is_left_unread(name: str) -> None:
    # Every param is read by the target's cost model, emitter or header, except the
    # paper's claims, which bench/targets.py prints beside the model's figures, and the
    # vendor library's peak and efficiency, which only library_cost reads.
    unmodelled = {"paper_c_conv", "paper_attention_fusion_speedup", "sdnn_flops_fp16",
                  "sdnn_efficiency"}
    module = hw_targets.get_target(name)
    for param in set(module.TARGET.params) - unmodelled:
        value = module.TARGET.param(param)
        assert any(_reached(module, with_param(param, v)(module.TARGET))
                   for v in (2 * value, 1)), param
    if name == "kunlunxin":
        from hw_targets.kunlunxin import library_cost

        for param in ("sdnn_flops_fp16", "sdnn_efficiency"):
            changed = with_param(param, module.TARGET.param(param) / 4)(module.TARGET)
            assert library_cost(GEMM, changed) != library_cost(GEMM, module.TARGET), param
