"""The inputs a model is verified and calibrated on: read from an .npz, or synthesised.

``--calib INPUTS.npz`` is an .npz keyed by the graph input names (``numpy.savez(path,
input=x)``); every problem with it is a :class:`~qmpass.errors.QmpassInputError` with one
sentence saying what to fix. Without it, inputs are synthesised from the graph input
types and shapes (see :func:`synthesize_inputs`).

Graph inputs that have an initializer (IR < 4 models list weights as inputs) are weights,
not inputs: they are neither read nor synthesised.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from qmpass.errors import QmpassInputError
from qmpass.extract.shapes import dim_size, infer_shapes

__all__ = ["check_feeds", "load_calib", "synthesize_inputs"]

_FLOATS = frozenset(
    {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
)
_INTS = frozenset(
    {TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
     TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64}
)

Dim = int | str | None  # static size, symbolic name, or unknown


@dataclass(frozen=True)
class _InputSpec:
    name: str
    elem_type: int
    dims: tuple[Dim, ...] | None  # None: rank unknown

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.elem_type))

    def describe(self) -> str:
        if self.dims is None:
            return "(any shape)"
        return "(" + ", ".join("?" if d is None else str(d) for d in self.dims) + ")"


def load_calib(path: str | os.PathLike[str], model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Read an .npz of inputs for ``model``, checked and cast to the inputs' element types.

    Checks: the file is a readable .npz; its keys are exactly the graph input names;
    each array has the input's rank and static dimensions, is numeric, finite and not
    empty; integer inputs hold integers in the type's range; arrays agree on every
    symbolic dimension they share, and all inputs with a dynamic first dimension agree on
    it (they are split into batches together).
    """
    file = Path(path)
    if not file.is_file():
        raise QmpassInputError(f"{file}: no such calibration file.")
    return check_feeds(_read_npz(file), model, str(file))


def check_feeds(
    arrays: Mapping[str, np.ndarray], model: onnx.ModelProto, source: str = "calibration inputs"
) -> dict[str, np.ndarray]:
    """The checks of :func:`load_calib` on feeds given in memory (``source`` names them in
    messages); returns them cast to the inputs' element types."""
    file = source
    arrays = {key: np.asarray(value) for key, value in arrays.items()}
    specs = _input_specs(model)
    expected = ", ".join(repr(s.name) for s in specs)
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise QmpassInputError(
            f"{file}: no array for graph input(s) {', '.join(map(repr, missing))}; the keys "
            f"must be the model's input names ({expected})."
        )
    known = {s.name for s in specs}
    extra = [key for key in arrays if key not in known]
    if extra:
        raise QmpassInputError(
            f"{file}: unknown key(s) {', '.join(map(repr, extra))}; the keys must be the "
            f"model's input names ({expected})."
        )
    feeds = {spec.name: _checked(file, spec, arrays[spec.name]) for spec in specs}
    _check_dims_agree(file, specs, feeds)
    return feeds


#: values of one synthesised input, at most (a 2**40-element declaration is not a batch)
SYNTHESIS_LIMIT = 2**28


def synthesize_inputs(
    model: onnx.ModelProto,
    count: int = 64,
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Random inputs for ``model`` from its graph input types and shapes.

    Shapes: a static dimension is kept; a symbolic one named in ``dims`` takes that size;
    a dynamic first dimension (and any dimension with the same symbolic name, e.g. the
    ``batch`` of a second input) is ``count``; every other dynamic dimension is 1. A model
    with a static first dimension gets that many samples, not ``count``.

    Values: float inputs are standard normal; an integer input that a ``Gather`` reads
    directly as its indices is uniform in ``[0, n)`` with ``n`` the size of the gathered
    axis of the data (the smallest over such Gathers; 1 if no shape is known); other
    integer inputs are 0 or 1; bool inputs are random.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, not {count}")
    sizes = dict(dims or {})
    specs = _input_specs(model)
    batch_names = {d for s in specs if s.dims and isinstance(d := s.dims[0], str)}
    rng = np.random.default_rng(seed)
    bounds = _gather_bounds(model, [s.name for s in specs if s.elem_type in _INTS])
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.dims is None:
            raise QmpassInputError(
                f"graph input {spec.name!r} has no declared shape, so inputs cannot be "
                "synthesised; pass --calib INPUTS.npz."
            )
        shape = tuple(_size(d, axis, count, sizes, batch_names) for axis, d in
                      enumerate(spec.dims))
        elements = prod(shape)
        if elements > SYNTHESIS_LIMIT:
            raise QmpassInputError(
                f"graph input {spec.name!r} has shape {shape}: {elements:,} values to "
                f"synthesise, more than {SYNTHESIS_LIMIT:,}; pass --calib INPUTS.npz."
            )
        if spec.elem_type in _FLOATS:
            values = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.elem_type in _INTS:
            values = rng.integers(0, bounds.get(spec.name, 2), size=shape).astype(spec.dtype)
        else:  # bool (_input_specs admits nothing else)
            values = rng.random(shape) < 0.5
        feeds[spec.name] = np.asarray(values)
    return feeds


def _size(dim: Dim, axis: int, count: int, sizes: Mapping[str, int],
          batch_names: set[str]) -> int:
    if isinstance(dim, int):
        return dim
    if dim is not None and dim in sizes:
        return int(sizes[dim])
    if axis == 0 or (isinstance(dim, str) and dim in batch_names):
        return count
    return 1


def _gather_bounds(model: onnx.ModelProto, names: list[str]) -> dict[str, int]:
    """For integer inputs read as ``Gather`` indices, the size of the gathered axis."""
    wanted = set(names)
    gathers = [n for n in model.graph.node
               if n.op_type == "Gather" and n.domain in ("", "ai.onnx") and len(n.input) > 1
               and n.input[1] in wanted]
    if not gathers:
        return {}
    shapes = infer_shapes(model)
    bounds: dict[str, int] = {}
    for node in gathers:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        shape = shapes.get(node.input[0])
        size = None
        if shape is not None and -len(shape) <= axis < len(shape):
            size = shape[axis]
        bound = 1 if size is None or size < 1 else size
        index = node.input[1]
        bounds[index] = min(bounds.get(index, bound), bound)
    return bounds


def _input_specs(model: onnx.ModelProto) -> list[_InputSpec]:
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for info in model.graph.input:
        if info.name in initializers:
            continue
        if info.type.WhichOneof("value") != "tensor_type":
            raise QmpassInputError(
                f"graph input {info.name!r} is not a tensor; qmpass feeds tensors only."
            )
        tensor_type = info.type.tensor_type
        if tensor_type.elem_type not in _FLOATS | _INTS | {TensorProto.BOOL}:
            type_name = TensorProto.DataType.Name(tensor_type.elem_type)
            raise QmpassInputError(
                f"graph input {info.name!r} has element type {type_name}, which qmpass "
                "cannot feed; only float, integer and bool inputs are supported."
            )
        dims: tuple[Dim, ...] | None = None
        if tensor_type.HasField("shape"):
            dims = tuple(
                size if (size := dim_size(d)) is not None else _symbol(d)
                for d in tensor_type.shape.dim
            )
        specs.append(_InputSpec(info.name, tensor_type.elem_type, dims))
    return specs


def _read_npz(file: Path) -> dict[str, np.ndarray]:
    hint = "save the inputs with numpy.savez(path, **{input_name: array})"
    try:
        loaded = np.load(file, allow_pickle=False)
    except Exception as exc:  # zipfile and numpy fail on bad bytes in many ways (BadZipFile,
        # NotImplementedError for an odd zip version, ValueError for pickles...)
        raise QmpassInputError(f"{file}: not a readable .npz file ({_first_line(exc)}); "
                               f"{hint}.") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise QmpassInputError(f"{file}: holds a single array, not arrays keyed by graph input "
                               f"names; {hint}.")
    with loaded:
        try:
            return {key: loaded[key] for key in loaded.files}
        except ValueError as exc:
            if "allow_pickle" not in str(exc):
                raise QmpassInputError(f"{file}: the .npz is damaged or truncated "
                                       f"({_first_line(exc)}); write it again.") from exc
            raise QmpassInputError(f"{file}: holds object arrays (strings or pickled "
                                   "objects), which qmpass does not load; give numeric "
                                   "arrays.") from exc
        except Exception as exc:  # a damaged member fails in many ways (zlib.error,
            # SyntaxError or TokenError from its header, MemoryError for an absurd shape)
            raise QmpassInputError(f"{file}: the .npz is damaged or truncated "
                                   f"({_first_line(exc)}); write it again.") from exc


def _checked(file: str, spec: _InputSpec, array: np.ndarray) -> np.ndarray:
    where = f"{file}: array {spec.name!r}"
    if array.dtype.kind not in "biuf":
        raise QmpassInputError(f"{where} has dtype {array.dtype}; inputs must be numeric.")
    if spec.dims is not None:
        if array.ndim != len(spec.dims):
            raise QmpassInputError(
                f"{where} has shape {array.shape} (rank {array.ndim}) but the model expects "
                f"rank {len(spec.dims)} {spec.describe()}."
            )
        for axis, (want, got) in enumerate(zip(spec.dims, array.shape, strict=True)):
            if isinstance(want, int) and want != got:
                raise QmpassInputError(
                    f"{where} has shape {array.shape} but the model expects "
                    f"{spec.describe()} (dimension {axis} must be {want})."
                )
    if array.size == 0:
        raise QmpassInputError(f"{where} is empty (shape {array.shape}); give at least one "
                               "sample.")
    if array.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise QmpassInputError(f"{where} has {bad} non-finite value(s) (NaN or infinity); "
                                   "calibration inputs must be finite.")
    target = spec.dtype
    if spec.elem_type in _INTS or spec.elem_type == TensorProto.BOOL:
        if array.dtype.kind == "f" and not np.all(np.equal(np.round(array), array)):
            raise QmpassInputError(f"{where} holds fractional values but the input is "
                                   f"{target}; give integers.")
        low, high = (0, 1) if target == np.bool_ else (np.iinfo(target).min,
                                                       np.iinfo(target).max)
        if array.dtype.kind != "b" and (array.min() < low or array.max() > high):
            raise QmpassInputError(f"{where} has values outside [{low}, {high}], the range "
                                   f"of the input's type {target}.")
    # (np.ascontiguousarray would turn a 0-d array into shape (1,))
    return np.require(array.astype(target, copy=False), requirements="C")


#: dimension names that mean "unknown", each dimension on its own (paddle2onnx writes "?")
_ANONYMOUS = ("", "?")


def _symbol(dim: onnx.TensorShapeProto.Dimension) -> str | None:
    """A dynamic dimension's symbol, which inputs must agree on (None: unrelated)."""
    return None if dim.dim_param in _ANONYMOUS else dim.dim_param


def _check_dims_agree(file: str, specs: list[_InputSpec], feeds: Mapping[str, np.ndarray]
                      ) -> None:
    seen: dict[str, tuple[str, int]] = {}  # dimension -> (first input, size)
    for spec in specs:
        if spec.dims is None:
            continue
        for axis, dim in enumerate(spec.dims):
            if isinstance(dim, int):
                continue
            keys = [f"symbolic dimension {dim!r}"] if dim is not None else []
            if axis == 0:
                keys.append("the batch dimension (axis 0)")
            size = int(feeds[spec.name].shape[axis])
            for key in keys:
                first, known = seen.setdefault(key, (spec.name, size))
                if known != size:
                    raise QmpassInputError(
                        f"{file}: arrays {first!r} and {spec.name!r} disagree on {key} "
                        f"({known} vs {size}); give every input the same number of samples."
                    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
