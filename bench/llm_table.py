"""Held-out perplexity of the byte-level LLaMA fixture at 20 / 40 / 60 % fewer weight
parameters, per low-rank method: the table of the low-rank LLM papers (issue 12, item 6).

The fixture is ``models/llama_text.onnx`` (``models/llama_text.py``: 4 decoder blocks,
RMSNorm, rotary embeddings, grouped-query attention, SwiGLU; byte vocabulary; trained on
the CPython standard library's sources, split by file). Every method is fitted on its
calibration windows (128 windows of 128 bytes; ``compress`` fits on 96 of them and verifies
on the other 32) and measured on its **test windows** (128 windows of 128 bytes from
files neither training nor calibration saw): perplexity is ``exp`` of the mean next-byte
cross-entropy of onnxruntime's logits over every position of every test window.

Weight parameters: those of the weight operators qmpass compresses, here the 29 MatMul
nodes with a stored weight (q/k/v/o, gate/up/down of each block and the output
projection). The embedding (a Gather), the RMSNorm scales and the rotary tables are not
weight operators and are neither compressed nor counted. ``keep`` is the fraction of
those parameters kept (0.8 / 0.6 / 0.4); "kept" is measured on the written model
(``report.to_dict()['keep_achieved']``, or the same count for the anchor built here).

Methods (every planned step kept: ``--keep`` alone, budget mode). The papers' baselines,
every operator at the same fraction of its parameters (rank ``floor(keep * m n / (m + n))``
for an ``m x n`` weight), built here from qmpass's factors and fitted on the same 96
windows as ``compress`` fits on:

* ``uniform svd``: plain truncated SVD.
* ``uniform asvd``: ASVD (input side scaled by the channels' root mean square to the
  power 0.5, :class:`qmpass.plan.factors.ActivationScaled`).
* ``uniform whitened (SVD-LLM)``: the whitened truncation, SVD-LLM's per-layer optimum.
* ``uniform whitened + sequential refit``: the same plan with its second factors and
  biases refitted in topological order (:func:`qmpass.plan.sequential.refit`: SVD-LLM's
  closed-form update) on the 96 fitting windows.

qmpass's ``compress``:

* ``whitened (uniform)``: ``CompressConfig(method="whitened")``: qmpass's own uniform
  allocation (each operator at its variant nearest the common fraction of its cost; a
  cross-check of the anchor above).
* ``whitened --allocation lagrangian``: the same truncations, ranks from the Lagrangian on
  each layer's own error.
* ``qmfrg --pricing layer``: qmpass's plan (shared bases for q/k/v and gate/up, cross-layer
  bases, the Lagrangian) priced by each unit's own error.
* ``qmfrg (default)``: ``CompressConfig(keep=..., calib=...)``: the same, priced by what
  the model's output feels of each unit (``qmpass.compress.sensitivity``).
* ``qmfrg --refit on``: the default plan, refitted.

``python bench/llm_table.py`` (``--keep 0.6`` for one budget).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from qmpass import CompressConfig, compress  # noqa: E402
from qmpass.algebra import lowrank_declines  # noqa: E402
from qmpass.compress import calibration_stats  # noqa: E402
from qmpass.compress.calibration import split_feeds  # noqa: E402
from qmpass.extract import Operator, extract_operators  # noqa: E402
from qmpass.extract.channels import channel_groups  # noqa: E402
from qmpass.plan.factors import ActivationScaled  # noqa: E402
from qmpass.plan.plan import Cost, Plan  # noqa: E402
from qmpass.plan.planner import Planned  # noqa: E402
from qmpass.plan.sequential import refit  # noqa: E402
from qmpass.plan.units import input_key, lowrank_candidate  # noqa: E402
from qmpass.rewrite import Applier  # noqa: E402
from qmpass.rewrite.base import name_nodes  # noqa: E402
from qmpass.verify import TensorStats, run_batched  # noqa: E402

NAME = "llama_text"
KEEPS = (0.8, 0.6, 0.4)
UNIFORM = {"svd": "uniform svd", "asvd": "uniform asvd",
           "whitened": "uniform whitened (SVD-LLM)"}  # the last is refitted too
QMPASS: dict[str, dict[str, Any]] = {
    "whitened (uniform)": {"method": "whitened"},
    "whitened --allocation lagrangian": {"method": "whitened", "allocation": "lagrangian"},
    "qmfrg --pricing layer": {"pricing": "layer"},
    "qmfrg (default)": {},
    "qmfrg --refit on": {"refit": "on"},
}


class Anchor:
    """Uniform plans: every operator at one fraction of its parameters, truncated by plain
    SVD, ASVD or whitened SVD (SVD-LLM) with qmpass's factors, fitted on the part of the
    calibration windows ``compress`` fits on."""

    def __init__(self, model: onnx.ModelProto, calib: dict[str, np.ndarray]) -> None:
        self.model = name_nodes(model)
        self.extraction = extract_operators(self.model)
        self.groups = channel_groups(self.model)
        self.fit = split_feeds(self.model, calib, 0.25, 0).fit  # compress's defaults
        self.stats = calibration_stats(self.model, self.extraction, self.groups, "whitened",
                                       self.fit)
        self.ops = [op for op in self.extraction.operators if lowrank_declines(op) is None]
        seen = {"svd": lambda op: None, "asvd": lambda op: ActivationScaled(self._stats(op)),
                "whitened": self._stats}
        self.candidates = {kind: {op.name: lowrank_candidate([op], view(op), 1, fused=False)
                                  for op in self.ops} for kind, view in seen.items()}
        self.applier = Applier(self.model, self.extraction, self.groups)

    def _stats(self, op: Operator) -> TensorStats:
        return self.stats[input_key(op).key]

    def plan(self, keep: float, kind: str) -> Planned:
        """Every operator at rank ``floor(keep * m n / (m + n))``, truncated by ``kind``."""
        steps, tensors = [], []
        for op in self.ops:
            d_out, d_in = op.shape
            rank = math.floor(keep * d_out * d_in / (d_out + d_in))
            candidate = self.candidates[kind][op.name]
            if candidate is None or rank < 1:
                continue
            variant = next((v for v in candidate.variants[1:] if v.label == rank), None)
            if variant is None:  # past the last saving (or the numerical) rank
                continue
            for step, arrays in variant.build():
                steps.append(step)
                tensors.append(arrays)
        plan = Plan(NAME, f"{kind} (uniform)", {"keep": keep}, Cost.of(self.ops),
                    tuple(steps))
        return Planned(plan, tuple(tensors), ())

    def build(self, planned: Planned) -> tuple[onnx.ModelProto, float]:
        """The model with every step of ``planned`` applied, and the fraction of the
        compressible operators' parameters it keeps (``keep_achieved``'s count)."""
        built, declined = self.applier.build(list(zip(planned.plan.steps, planned.tensors,
                                                      strict=True)))
        if declined:
            raise RuntimeError(f"steps declined: {declined}")
        before = sum(op.params for op in self.extraction.operators)
        after = sum(op.params for op in extract_operators(built).operators)
        baseline = sum(op.params for op in self.ops)
        return built, (after - (before - baseline)) / baseline


def _perplexity(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    return models.perplexity(run_batched(model, {"input": x})[0], y)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, nargs="*", default=list(KEEPS))
    args = parser.parse_args()
    started = time.perf_counter()
    original = onnx.load(str(models.fixture_path(NAME)))
    calib = models.load_calib(NAME)
    x, y = models.load_llm_test(NAME)
    base = _perplexity(original, x, y)
    anchor = Anchor(original, calib)
    print(f"original held-out perplexity: {base:.4f} (uniform bytes: 256); "
          f"{x.shape[0]} test windows of {x.shape[1]} bytes\n")
    print("| fewer weight params | keep | method | kept (measured) | held-out perplexity | "
          "seconds |")
    print("|---:|---:|---|---:|---:|---:|")
    for keep in args.keep:
        rows: list[tuple[str, float, onnx.ModelProto, float]] = []
        for kind, label in UNIFORM.items():
            timer = time.perf_counter()
            uniform = anchor.plan(keep, kind)
            built, kept = anchor.build(uniform)
            rows.append((label, kept, built, time.perf_counter() - timer))
        timer = time.perf_counter()
        built, kept = anchor.build(refit(anchor.model, anchor.extraction, anchor.groups,
                                         uniform, anchor.fit))
        rows.append(("uniform whitened + sequential refit", kept, built,
                     time.perf_counter() - timer))
        for label, extra in QMPASS.items():
            timer = time.perf_counter()
            model, report = compress(original, CompressConfig(keep=keep, calib=calib, **extra))
            rows.append((label, float(report.to_dict()["keep_achieved"]), model,
                         time.perf_counter() - timer))
        for label, kept, model, seconds in rows:
            print(f"| {1 - keep:.0%} | {keep:g} | {label} | {kept:.3f} | "
                  f"{_perplexity(model, x, y):.4f} | {seconds:.0f} |", flush=True)
    print(f"\noriginal: {base:.4f}; total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
