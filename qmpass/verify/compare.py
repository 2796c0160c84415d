"""Numerical comparison of a candidate model's outputs with the original's.

The figure of merit is the relative error over all outputs taken together,
``||y' - y||_F / ||y||_F`` with ``y`` every output flattened and concatenated: the
quantity ``--tolerance`` bounds. Where the reference is all zeros the relative error is
0 if the candidate is exactly equal and infinite otherwise; a candidate that produces
NaN or infinity where the reference does not has an infinite error, so a tolerance check
``relative_error <= T`` fails as it should.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from qmpass.errors import QmpassInputError
from qmpass.extract.shapes import dim_size
from qmpass.verify.runner import DEFAULT_BATCH, ORT_ERRORS, run_batched, session

__all__ = ["Verification", "Verifier", "accuracy", "compare", "sample_count"]


@dataclass(frozen=True)
class Verification:
    """How far a candidate's outputs are from the reference on ``inputs`` samples."""

    max_abs_error: float
    relative_error: float
    inputs: int
    per_output: tuple[float, ...] = ()
    failure: str | None = None  # why the candidate could not be run (its errors are NaN)

    @property
    def passes(self) -> bool:
        """Whether the candidate ran at all (a NaN error is within no tolerance)."""
        return self.failure is None

    def to_dict(self) -> dict[str, Any]:
        """The report's ``verification`` record. JSON has no infinity: an infinite or NaN
        error is written as ``null``."""
        return {
            "max_abs_error": _json_float(self.max_abs_error),
            "relative_error": _json_float(self.relative_error),
            "inputs": self.inputs,
            "per_output": [_json_float(e) for e in self.per_output],
            **({} if self.failure is None else {"failure": self.failure}),
        }


def compare(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], inputs: int
) -> Verification:
    """Compare outputs position by position (same count, same shapes, any numeric dtype)."""
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference outputs but {len(candidate)} candidates")
    diff_sq = ref_sq = 0.0
    max_abs = 0.0
    per_output: list[float] = []
    for index, (ref, cand) in enumerate(zip(reference, candidate, strict=True)):
        r, c = _values(ref), _values(cand)
        if r.shape != c.shape:
            raise ValueError(f"output {index}: reference shape {r.shape}, candidate {c.shape}")
        if r.dtype.kind not in "biufc":  # strings and other non-numbers: equal or not
            r, c = np.zeros(r.shape), np.where(r == c, 0.0, np.inf)
        r, c = r.astype(np.float64), c.astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(c - r)
        # equal values are equal, whatever they are (NaN where both are NaN, equal infinities)
        diff[(r == c) | (np.isnan(r) & np.isnan(c))] = 0.0
        diff[np.isnan(diff)] = np.inf
        d_sq = float(np.sum(np.square(diff))) if diff.size else 0.0
        r_sq = float(np.sum(np.square(r[np.isfinite(r)])))
        diff_sq += d_sq
        ref_sq += r_sq
        max_abs = max(max_abs, float(diff.max()) if diff.size else 0.0)
        per_output.append(relative(d_sq, r_sq))
    return Verification(
        max_abs_error=max_abs,
        relative_error=relative(diff_sq, ref_sq),
        inputs=int(inputs),
        per_output=tuple(per_output),
    )


class Verifier:
    """The original model's outputs on fixed feeds, and checks of candidates against them.

    The reference outputs are computed once, at construction (a model onnxruntime cannot
    load or run is refused there as bad input); :meth:`check` costs one
    onnxruntime session (graph optimisations on) and one batched run of the candidate on
    the same feeds. The compress loop calls it once per trial rewrite.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        feeds: Mapping[str, np.ndarray],
        batch: int = DEFAULT_BATCH,
    ) -> None:
        self._feeds = dict(feeds)
        self._batch = batch
        self._outputs = [out.name for out in model.graph.output]
        try:
            reference = run_batched(session(model), self._feeds, batch, self._outputs)
        except ORT_ERRORS as exc:  # the original is the user's model: bad input, not a bug
            raise QmpassInputError(
                f"onnxruntime {ort.__version__} cannot run the model, so nothing can be "
                f"verified ({_first_line(exc)})."
            ) from exc
        self._reference = tuple(reference)
        self._inputs = sample_count(model, self._feeds)

    @property
    def reference(self) -> tuple[np.ndarray, ...]:
        """The original model's outputs, in graph output order."""
        return self._reference

    @property
    def inputs(self) -> int:
        """The number of samples the checks run on."""
        return self._inputs

    def check(self, candidate: onnx.ModelProto) -> Verification:
        """Run ``candidate`` on the feeds and compare its outputs (matched by name)."""
        names = {out.name for out in candidate.graph.output}
        missing = [name for name in self._outputs if name not in names]
        if missing:
            raise ValueError(f"the candidate model lacks the output(s) {', '.join(missing)}")
        try:
            outputs = run_batched(session(candidate), self._feeds, self._batch, self._outputs)
        except ORT_ERRORS as exc:  # a rewrite onnxruntime has no kernel for (float64 Add
            # at opset 6): the candidate fails verification, whatever the tolerance
            return Verification(math.nan, math.nan, self._inputs,
                                failure=f"onnxruntime cannot run it ({_first_line(exc)})")
        return compare(self._reference, outputs, self._inputs)


def accuracy(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    labels: np.ndarray,
    batch: int = DEFAULT_BATCH,
) -> float:
    """Top-1 accuracy of a classifier: the argmax of its first output (one row of scores
    per sample) against integer ``labels``."""
    (scores, *_) = run_batched(session(model), feeds, batch)
    labels = np.asarray(labels).reshape(-1)
    if scores.ndim == 0 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels but the first output has shape "
                         f"{scores.shape}")
    predicted = np.argmax(scores.reshape(labels.shape[0], -1), axis=1)
    return float(np.mean(predicted == labels))


def sample_count(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> int:
    """How many samples ``feeds`` hold, by the batch-first convention: the common axis-0
    length of the graph inputs when each has a dynamic first dimension, or a static one
    and rank 2 or more (a batch of vectors or images); else 1."""
    initializers = {t.name for t in model.graph.initializer}
    lengths: set[int] = set()
    for info in model.graph.input:
        if info.name in initializers:
            continue
        array = feeds.get(info.name)
        if array is None or np.ndim(array) == 0:
            return 1
        dims = info.type.tensor_type.shape.dim
        dynamic = not dims or dim_size(dims[0]) is None
        if not dynamic and np.ndim(array) < 2:
            return 1
        lengths.add(int(np.shape(array)[0]))
    return lengths.pop() if len(lengths) == 1 else 1


def _values(output: Any) -> np.ndarray:
    """An output as an array of at least one dimension: a tensor (a scalar too), or a
    sequence of tensors with its elements flattened and concatenated."""
    if isinstance(output, list | tuple):
        parts = [np.ravel(np.asarray(item)) for item in output]
        return np.concatenate(parts) if parts else np.zeros(0)
    return np.atleast_1d(np.asarray(output))


def relative(diff_sq: float, ref_sq: float) -> float:
    """``sqrt(diff_sq / ref_sq)``, the module docstring's relative error of two sums."""
    if ref_sq == 0.0:
        return 0.0 if diff_sq == 0.0 else math.inf
    return math.sqrt(diff_sq / ref_sq)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None
