"""``qmpass lower``: a model's weight operators as kernels of a target, run and checked.

Every MatMul/Gemm (weight on the right) and 2-D Conv of the main graph becomes the
target's kernels (:mod:`hw_targets.lower`), with the weights as extraction reads them (a
BatchNormalization that alone follows a Conv is folded into it, as an inference compiler
does, and the Add of a MatMul's bias rides along). The kernels run in the target's CPU
simulation on the operator's real input, captured from onnxruntime running the model on
the calibration inputs (or synthesised ones), and their output is compared with what
onnxruntime computed for the same tensor; the error must stay within the rounding bound
of the target's arithmetic. Operators left to the host (activations, normalisations,
attention's activation-activation products) are counted, operators that look like weight
operators but cannot be lowered are listed with the reason.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import hw_targets
from qmpass.algebra import conv_kernel, row_linear_declines, subgraph_declines
from qmpass.errors import QmpassInputError
from qmpass.extdata import data_folder
from qmpass.extract import Operator, extract_operators
from qmpass.extract.shapes import infer_types
from qmpass.modelio import LoadedModel, ModelLike, load_model
from qmpass.rewrite.base import name_nodes
from qmpass.rewrite.gated_lowrank import refuse_gated
from qmpass.verify import check_feeds, synthesize_inputs
from qmpass.verify.runner import ORT_ERRORS, feed_batches, session_with_tensors

__all__ = ["LowerConfig", "LoweringReport", "lower"]


@dataclass(frozen=True)
class LowerConfig:
    """``target``: one of :data:`hw_targets.TARGET_NAMES`; ``samples``: how many samples of
    the calibration (or synthesised) inputs the kernels run on. Invalid values raise
    :class:`~qmpass.errors.QmpassInputError`."""

    target: str
    calib: Mapping[str, np.ndarray] | None = None
    samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target not in hw_targets.TARGET_NAMES:
            raise QmpassInputError(
                f"unknown target '{self.target}'; choose one of "
                f"{', '.join(hw_targets.TARGET_NAMES)}."
            )
        if isinstance(self.samples, bool) or not isinstance(self.samples, (int, np.integer)) \
                or self.samples < 1:
            raise QmpassInputError(f"--samples must be at least 1, got {self.samples!r}.")


@dataclass(frozen=True)
class LoweringReport:
    """What ``lowering.json`` holds (see :meth:`to_dict`)."""

    model: str
    target: hw_targets.Target
    kernels: tuple[dict[str, Any], ...]
    not_lowered: tuple[dict[str, str], ...]
    host_ops: Mapping[str, int]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        predicted = sum(k["predicted_cycles"] for k in self.kernels)
        simulated = sum(k["simulated_cycles"] for k in self.kernels)
        return {
            "model": self.model,
            "target": {
                "name": self.target.name,
                "dialect": self.target.dialect,
                "summary": self.target.summary,
                "parameters": self.target.table(),
            },
            "cycles": {"predicted": predicted, "simulated": simulated},
            "operators": list(self.kernels),
            "not_lowered": list(self.not_lowered),
            "host_ops": dict(self.host_ops),
            "all_within_bound": all(k["within_bound"] for k in self.kernels),
            "seconds": round(self.seconds, 3),
        }


def lower(
    model: ModelLike, config: LowerConfig, out_dir: str | Path | None = None
) -> LoweringReport:
    """Lower, simulate and check every lowerable weight operator of ``model``.

    With ``out_dir`` the kernels, headers, harness, inputs, ``build.sh`` and
    ``lowering.json`` are written there (atomically: a directory is renamed into place).
    """
    started = time.perf_counter()
    if out_dir is not None:
        _check_out_dir(Path(out_dir))  # before any work
    loaded = load_model(model)
    with data_folder(loaded.folder):  # external data: read a tensor at a time from there
        return _lower(loaded, config, out_dir, started)


def _lower(
    loaded: LoadedModel, config: LowerConfig, out_dir: str | Path | None, started: float
) -> LoweringReport:
    module = hw_targets.get_target(config.target)  # LowerConfig checked the name
    proto = loaded.proto
    refuse_gated(proto, "lower")
    extraction = extract_operators(proto, loaded.external)
    not_lowered = [{"operator": s.name, "op_type": s.op_type, "reason": s.reason}
                   for s in (*extraction.skipped, *extraction.unsupported)]
    lowerable: list[Operator] = []
    types = infer_types(proto, [op.input for op in extraction.operators])
    for op in extraction.operators:
        reason = _declines(op, types.get(op.input, onnx.TensorProto.FLOAT))
        if reason is None:
            lowerable.append(op)
        else:
            not_lowered.append({"operator": op.name, "op_type": op.op_type, "reason": reason})
    if not lowerable:
        raise QmpassInputError(
            f"{loaded.name} has no operator that qmpass can lower for "
            f"{config.target} (it lowers MatMul/Gemm with a constant right-hand weight and "
            "2-D Conv outside subgraphs, float32)"
            + (f"; {not_lowered[0]['operator']}: {not_lowered[0]['reason']}." if not_lowered
               else ".")
        )
    tensors = _capture(proto, config, lowerable)
    target = module.TARGET
    lowerings, feeds = [], []
    for index, op in enumerate(lowerable):
        name = _kernel_name(index, op.name)
        lowering, feed = _lowering(module, target, name, op, tensors[op.input])
        lowerings.append(lowering)
        feeds.append(feed)
    results = hw_targets.simulate_all(lowerings, feeds)

    kernels = []
    for op, lowering, feed, (output, counters) in zip(lowerable, lowerings, feeds, results,
                                                      strict=True):
        expected = tensors[op.output].astype(np.float64).reshape(output.shape)
        error = np.abs(output - expected)
        bound = lowering.error_bound(feed)
        costs = lowering.costs()
        kernels.append({
            "operator": op.name,
            "op_type": op.op_type,
            "kernels": [
                {
                    "name": launch.kernel.name,
                    "kind": "gemm" if isinstance(spec, hw_targets.GemmSpec) else "im2col",
                    "shape": _shape(spec),
                    "tiling": None if tiling is None else tiling.to_dict(),
                    "predicted": cost.to_dict(),
                    "simulated_cycles": int(counted["cycles"]),  # type: ignore[call-overload]
                    "simulated_pipes": counted["pipes"],
                    "roofline_cycles": hw_targets.roofline(spec, target),
                }
                for launch, spec, tiling, cost, counted in zip(
                    lowering.launches, lowering.specs, lowering.tilings, costs, counters,
                    strict=True,
                )
            ],
            "predicted_cycles": sum(c.cycles for c in costs),
            "simulated_cycles": sum(int(c["cycles"]) for c in counters),  # type: ignore[call-overload]
            "roofline_cycles": lowering.roofline(),
            "max_abs_error": float(error.max()),
            "relative_error": float(np.linalg.norm(error) / max(np.linalg.norm(expected),
                                                                 1e-300)),
            "error_bound": float(bound.max()),
            "within_bound": bool(np.all(error <= bound * (1 + 1e-9))),
        })
    # the kernels also compute a MatMul's bias Add and a Conv's folded BatchNormalization:
    # the nodes that produce the operators' outputs
    folded = {op.output for op in lowerable}
    lowered = {op.name for op in lowerable}
    host = Counter(node.op_type for node, name in zip(proto.graph.node, _node_names(proto),
                                                      strict=True)
                   if name not in lowered and not folded.intersection(node.output))
    report = LoweringReport(loaded.name, target, tuple(kernels), tuple(not_lowered),
                            dict(sorted(host.items())), time.perf_counter() - started)
    if out_dir is not None:
        _write(Path(out_dir), lowerings, feeds, report)
    return report


def _node_names(proto: onnx.ModelProto) -> list[str]:
    """The names extraction gives the main graph's nodes (an unnamed node is
    ``<op_type>_<index>``): :func:`~qmpass.rewrite.base.name_nodes` of the nodes alone,
    without copying the weights."""
    nodes = onnx.ModelProto()
    nodes.graph.node.extend(proto.graph.node)
    return [node.name for node in name_nodes(nodes).graph.node]


def _declines(op: Operator, input_type: int) -> str | None:
    reason = subgraph_declines(op, "left to the host")
    if reason is not None:
        return reason
    if 0 in op.weight.shape:
        return f"its weight is empty ({op.shape[0]}x{op.shape[1]})"
    if input_type != onnx.TensorProto.FLOAT:
        name = onnx.TensorProto.DataType.Name(input_type)
        return (f"its input is {name}; kernels are checked against float32 references only")
    if op.op_type in ("MatMul", "Gemm"):
        if op.unfolded_bias:
            return "its Gemm C is not a per-output vector (the kernels add one bias row)"
        return row_linear_declines(op, "lowered")
    if op.op_type != "Conv":
        return f"{op.op_type} is not lowered"
    geometry = op.geometry
    assert geometry is not None
    if len(geometry.kernel_shape) != 2:
        return f"{len(geometry.kernel_shape)}-D convolution is not lowered (2-D only)"
    if geometry.auto_pad not in ("NOTSET", "VALID"):
        return f"auto_pad={geometry.auto_pad} is not lowered (explicit pads only)"
    return None


def _capture(
    proto: onnx.ModelProto, config: LowerConfig, ops: list[Operator]
) -> dict[str, np.ndarray]:
    """The operators' input and output tensors on the first ``samples`` samples."""
    if config.calib is not None:
        feeds = check_feeds(dict(config.calib), proto, "calibration inputs")
    else:
        feeds = synthesize_inputs(proto, count=config.samples, seed=config.seed)
    names = sorted({t for op in ops for t in (op.input, op.output)})
    try:
        sess = session_with_tensors(proto, names)
        first = next(iter(feed_batches(sess, feeds, config.samples)))
        values = sess.run(names, first)
    except ORT_ERRORS as exc:  # the user's model, not ours: bad input
        raise QmpassInputError(
            f"onnxruntime cannot run the model, so the kernels cannot be checked "
            f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})."
        ) from exc
    return {name: np.asarray(value) for name, value in zip(names, values, strict=True)}


def _lowering(
    module: hw_targets.TargetModule,
    target: hw_targets.Target,
    name: str,
    op: Operator,
    x: np.ndarray,
) -> tuple[hw_targets.Lowering, dict[str, np.ndarray]]:
    d_out, d_in = op.shape
    bias = op.bias
    if op.op_type in ("MatMul", "Gemm"):
        rows = x.size // d_in
        lowering = hw_targets.lower_matmul(module, target, name, rows, d_in, d_out,
                                           bias is not None)
        feed = {"a": x.reshape(rows, d_in), "b": np.asarray(op.weight).T,
                "bias": np.zeros(1) if bias is None else np.asarray(bias)}
        return lowering, feed
    geometry = op.geometry
    assert geometry is not None
    groups = geometry.groups
    kh, kw = geometry.kernel_shape
    weight = conv_kernel(op.weight, (kh, kw), groups)
    pads = tuple(geometry.pads) if geometry.auto_pad == "NOTSET" else (0, 0, 0, 0)
    lowering = hw_targets.lower_conv(
        module, target, name, tuple(x.shape),  # type: ignore[arg-type]
        d_out, (kh, kw), tuple(geometry.strides), pads,  # type: ignore[arg-type]
        tuple(geometry.dilations), groups, bias is not None,  # type: ignore[arg-type]
    )
    feed = {"a": weight, "x": x, "bias": np.zeros(1) if bias is None else np.asarray(bias)}
    return lowering, feed


def _kernel_name(index: int, op_name: str) -> str:
    """A C++ identifier for the operator's kernels: ``k<index>_<sanitised name>``."""
    stem = re.sub(r"\W+", "_", op_name).strip("_")[:40] or "op"
    return f"k{index}_{stem}"


def _shape(spec: hw_targets.KernelSpec) -> dict[str, Any]:
    if isinstance(spec, hw_targets.GemmSpec):
        return {"batch": spec.batch, "m": spec.m, "k": spec.k, "n": spec.n, "bias": spec.bias}
    return {"images": spec.images, "channels": spec.channels, "height": spec.height,
            "width": spec.width, "kernel": list(spec.kernel), "strides": list(spec.strides),
            "pads": list(spec.pads), "dilations": list(spec.dilations), "groups": spec.groups}


def _write(
    directory: Path,
    lowerings: list[hw_targets.Lowering],
    feeds: list[dict[str, np.ndarray]],
    report: LoweringReport,
) -> None:
    """Write the bundle beside ``directory`` and rename it into place (nothing half-written)."""
    _check_out_dir(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        hw_targets.write_bundle(lowerings, feeds, staging)
        (staging / "lowering.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _check_out_dir(directory: Path) -> None:
    """Refuse a destination that is not empty and not an earlier lowering (it is replaced)."""
    if directory.exists() and not (directory.is_dir() and (
            not any(directory.iterdir()) or (directory / "lowering.json").is_file())):
        raise QmpassInputError(
            f"{directory} exists and is not an earlier qmpass lowering; choose another -o."
        )



