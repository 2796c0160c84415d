"""External data: weights read one tensor at a time, never all resident.

A model read from a file keeps its external-data tensors as references
(``data_location = EXTERNAL``, a ``location`` relative to the model's folder, an offset
and a length): nothing loads them into the ``ModelProto``, so the proto stays small (any
model size serialises) and copying it copies no weights. Who needs a value reads it here:

* :func:`tensor_array` reads one tensor through a memory map of its file (the pages are
  the file's, dropped when the array is);
* :class:`LazyArray` names a tensor (file, offset, shape) and a transpose/scale of it,
  read when used, so an operator can hold its weight without holding the memory
  (:class:`HeldArray` does the same for a weight in memory: no float64 copy is held);
* :func:`data_folder` says, for the duration of a ``with`` block, which folder the
  relative locations are in (``analyze``, ``compress`` and ``lower`` set it to the model's
  folder); onnxruntime sessions are told the same folder (:mod:`qmpass.verify.runner`);
* :func:`model_payloads` writes a model with its external data: a ``<model>.data`` file
  beside it, streamed tensor by tensor from the input's files, written atomically with it.
"""

from __future__ import annotations

import threading
import uuid
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from google.protobuf.message import Message
from onnx import TensorProto, helper, numpy_helper

from qmpass.errors import QmpassInputError
from qmpass.scratch import SPILLED
from qmpass.scratch import resolve as resolve_scratch

__all__ = [
    "ConvertedArray",
    "HeldArray",
    "LazyArray",
    "copy_fields",
    "current_folder",
    "data_folder",
    "external_entries",
    "external_tensors",
    "is_external",
    "model_payloads",
    "spilled",
    "tensor_array",
]

_FOLDER: ContextVar[Path | None] = ContextVar("qmpass_data_folder", default=None)
#: tensors at least this large (bytes) go to the ``.data`` file when one is written
EXTERNAL_THRESHOLD = 1024
#: bytes of one serialised protobuf message
PROTOBUF_LIMIT = 2**31


@contextmanager
def data_folder(folder: Path | None) -> Iterator[None]:
    """Within the block, external-data locations are relative to ``folder``."""
    token = _FOLDER.set(None if folder is None else Path(folder).resolve())
    try:
        yield
    finally:
        _FOLDER.reset(token)


def current_folder() -> Path | None:
    return _FOLDER.get()


def is_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def in_scratch(tensor: TensorProto) -> bool:
    """Whether ``tensor`` is a rewrite's new tensor in a scratch file (:mod:`qmpass.scratch`)."""
    return is_external(tensor) and resolve_scratch(
        external_entries(tensor).get("location", "")) is not None


def spilled(tensor: TensorProto) -> bool:
    """Whether ``tensor`` is an initializer of the input that qmpass moved to a scratch
    file at load (:func:`qmpass.modelio.spill_embedded`)."""
    return is_external(tensor) and external_entries(tensor).get("location") == SPILLED


def external_entries(tensor: TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def external_tensors(model: onnx.ModelProto) -> list[TensorProto]:
    """Every tensor of the model (initializers, Constant values, subgraphs) stored in an
    external file."""
    return [t for t in _all_tensors(model) if is_external(t)]


def _all_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    def graph_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors
                elif attr.type == onnx.AttributeProto.GRAPH:
                    yield from graph_tensors(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        yield from graph_tensors(sub)
    yield from graph_tensors(model.graph)


@dataclass(frozen=True)
class _Place:
    path: Path
    offset: int
    length: int


def _place(tensor: TensorProto, folder: Path | None) -> _Place:
    entries = external_entries(tensor)
    location = entries.get("location", "")
    scratch = resolve_scratch(location)  # a new tensor of a rewrite (qmpass.scratch)
    if scratch is not None:
        return _Place(scratch, int(entries["offset"]), int(entries["length"]))
    if folder is None:
        raise QmpassInputError(
            f"tensor '{tensor.name}' is stored in the external file '{location}', but the "
            "model was not read from a file; give its path instead.")
    try:
        offset = int(entries.get("offset", "0"))
        length = int(entries["length"]) if "length" in entries else -1
    except ValueError as exc:
        raise QmpassInputError(
            f"tensor '{tensor.name}': its external data offset or length is not a number."
        ) from exc
    return _Place(folder / location, offset, length)


def check_external(model: onnx.ModelProto, folder: Path, source: str) -> tuple[Path, ...]:
    """The data files of ``model`` (in ``folder``), after checking that each external
    tensor's location stays in the folder and its bytes are all there."""
    files: dict[Path, int] = {}
    for tensor in external_tensors(model):
        location = external_entries(tensor).get("location", "")
        if not location or Path(location).is_absolute() or ".." in Path(location).parts:
            raise QmpassInputError(
                f"{source}: tensor '{tensor.name}' has the external data location "
                f"'{location}', which is not a file name relative to the model's folder.")
        place = _place(tensor, folder)
        if place.path not in files:
            if not place.path.is_file():
                raise QmpassInputError(
                    f"{source}: the external data file {place.path} of tensor "
                    f"'{tensor.name}' is missing; keep the data files beside the model.")
            files[place.path] = place.path.stat().st_size
        need = _nbytes(tensor)
        length = need if place.length < 0 else place.length
        if need is not None and length != need:
            raise QmpassInputError(
                f"{source}: tensor '{tensor.name}' needs {need} bytes but its external "
                f"data length is {length}.")
        if length is None or place.offset < 0 or place.offset + length > files[place.path]:
            raise QmpassInputError(
                f"{source}: the external data file {place.path} is too short for tensor "
                f"'{tensor.name}' (truncated?).")
    return tuple(sorted(files))


def _nbytes(tensor: TensorProto) -> int | None:
    """Bytes of a tensor's raw data, or None for a type without a fixed size."""
    if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (count * 4 + 7) // 8
    return count * np.dtype(dtype).itemsize


def tensor_array(tensor: TensorProto, folder: Path | None = None) -> np.ndarray:
    """The value of ``tensor``; an external one read from ``folder`` (default: the folder
    of :func:`data_folder`) through a memory map, without touching ``tensor``."""
    if not is_external(tensor):
        return numpy_helper.to_array(tensor)
    place = _place(tensor, folder if folder is not None else current_folder())
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    simple = np.dtype(dtype).kind in "biuf" and np.dtype(dtype).byteorder in "=<|"
    if not simple or tensor.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return numpy_helper.to_array(tensor, str(place.path.parent))
    shape = tuple(int(d) for d in tensor.dims)
    try:
        if int(np.prod(shape, dtype=np.int64)) == 0:
            return np.zeros(shape, dtype)
        return np.memmap(place.path, dtype=dtype, mode="r", offset=place.offset, shape=shape)
    except (OSError, ValueError) as exc:
        raise QmpassInputError(
            f"tensor '{tensor.name}' cannot be read from {place.path} ({exc}).") from exc


class ConvertedArray:
    """What :class:`LazyArray` and :class:`HeldArray` share: a stored value read when
    :meth:`load` is called, ``value.astype(float64)``, transposed if ``transpose``, times
    ``scale``, contiguous and read-only (exactly what extraction computes for a weight).
    A few recent loads are kept (``_CACHE_BYTES``) so repeated uses do not convert again,
    and a load still in use elsewhere is returned again rather than made twice."""

    transpose: bool
    scale: float

    @property
    def _key(self) -> tuple[object, ...]:
        raise NotImplementedError

    def _stored(self) -> np.ndarray:
        raise NotImplementedError

    def stored_view(self) -> np.ndarray | None:
        """The value in its stored floating-point type, transposed as :meth:`load`'s,
        without converting it (a view of the stored array or a memory map), or the
        float64 conversion where one is held already; None where the stored values are
        not the value (a folded scale, an integer type)."""
        with _CACHE_LOCK:
            found = _CACHE.get(self._key)
            found = _IN_USE.get(self._key) if found is None else found
        if found is not None:
            return found
        if self.scale != 1.0:
            return None
        stored = self._stored()
        if stored.dtype.kind != "f":
            return None
        view = stored.T if self.transpose else stored.view()  # (the source's flags stay)
        view.setflags(write=False)
        return view

    def load(self) -> np.ndarray:
        key = self._key
        with _CACHE_LOCK:
            _drop_forgotten()
            if key in _CACHE:
                _CACHE.move_to_end(key)
                return _CACHE[key]
            found = _IN_USE.get(key)  # still held by someone: that copy, not a second
            if found is not None:
                _CACHE[key] = found
                return found
        stored = self._stored()
        array = np.empty(stored.shape[::-1] if self.transpose else stored.shape)
        np.copyto(array, stored.T if self.transpose else stored)  # converted in one pass
        if self.scale != 1.0:
            array *= self.scale
        array.setflags(write=False)
        with _CACHE_LOCK:
            array = _IN_USE.setdefault(key, array)
            _CACHE[key] = array
            while len(_CACHE) > 1 and sum(a.nbytes for a in _CACHE.values()) > _CACHE_BYTES:
                _CACHE.popitem(last=False)
        return array


class LazyArray(ConvertedArray):
    """A float64 view of one external tensor (:class:`ConvertedArray`), read from its file
    through a memory map when used."""

    def __init__(self, tensor: TensorProto, folder: Path, transpose: bool,
                 scale: float) -> None:
        place = _place(tensor, folder)
        self.path, self.offset = str(place.path.resolve()), place.offset
        self.dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).str
        self.stored = tuple(int(d) for d in tensor.dims)
        self.transpose, self.scale = transpose, scale
        self.shape = self.stored[::-1] if transpose else self.stored

    @property
    def _key(self) -> tuple[object, ...]:
        return (self.path, self.offset, self.dtype, self.stored, self.transpose, self.scale)

    def _stored(self) -> np.ndarray:
        return np.memmap(self.path, dtype=np.dtype(self.dtype), mode="r", offset=self.offset,
                         shape=self.stored)


class HeldArray(ConvertedArray):
    """A float64 view (:class:`ConvertedArray`) of a constant held in memory in its stored
    form: an initializer of the model (its ``TensorProto``, converted when used) or a
    value folded from constants (an array of its own type). An operator holding one holds
    no float64 copy of its weight: extraction of VGG-19 held 1.1 GB of them beside the
    model's 0.55 GB."""

    def __init__(self, source: TensorProto | np.ndarray, transpose: bool, scale: float
                 ) -> None:
        self.source, self.transpose, self.scale = source, transpose, scale
        stored = (tuple(int(d) for d in source.dims) if isinstance(source, TensorProto)
                  else source.shape)
        self.shape = stored[::-1] if transpose else stored
        self._token = uuid.uuid4().hex  # the cache's key, also in a pickled copy
        weakref.finalize(self, _forget, ("held", self._token))

    @property
    def _key(self) -> tuple[object, ...]:
        return ("held", self._token)

    def _stored(self) -> np.ndarray:
        if isinstance(self.source, TensorProto):
            return numpy_helper.to_array(self.source)
        return self.source


def _forget(key: tuple[object, ...]) -> None:
    """A :class:`HeldArray` is gone: its conversion leaves the cache at the next use of
    it. Not here: this runs from the garbage collector, possibly inside ``load`` while it
    holds the cache's lock (waiting for it would wait forever)."""
    _FORGOTTEN.append(key)


def _drop_forgotten() -> None:
    """Drop the conversions of :class:`HeldArray` s that are gone (the lock held)."""
    while _FORGOTTEN:
        _CACHE.pop(_FORGOTTEN.popleft(), None)


def release() -> None:
    """Empty the cache of recently read weights (:class:`LazyArray`)."""
    with _CACHE_LOCK:
        _CACHE.clear()
        _FORGOTTEN.clear()


_CACHE: OrderedDict[tuple[object, ...], np.ndarray] = OrderedDict()
#: every loaded array still referenced somewhere (a held projection's weight): loading
#: it again returns it
_IN_USE: weakref.WeakValueDictionary[tuple[object, ...], np.ndarray] = \
    weakref.WeakValueDictionary()
_CACHE_LOCK = threading.Lock()
_CACHE_BYTES = 256 * 2**20
#: keys of HeldArrays that are gone (appended by the garbage collector, lock-free)
_FORGOTTEN: deque[tuple[object, ...]] = deque()


Payload = bytes | str | Callable[[BinaryIO], None]


def copy_fields(source: Message, target: Message, skip: str) -> None:
    """Copy every field ``source`` has set but ``skip`` onto ``target`` (of its type)."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def skeleton(
    model: onnx.ModelProto, take: Callable[[TensorProto], bool]
) -> tuple[onnx.ModelProto, list[tuple[TensorProto, TensorProto]]]:
    """A copy of ``model`` in which the main graph's initializers that ``take`` selects
    are copied without their data (name, type and dims only), with the pairs (copy,
    original) of those: the data is read from the original when it is needed, so no
    tensor is ever held twice."""
    copy = onnx.ModelProto()
    graph = model.graph
    inits = list(graph.initializer)
    # everything but the initializers: copy the graph minus them, a field at a time
    copy_fields(model, copy, skip="graph")
    copy_fields(graph, copy.graph, skip="initializer")
    moved: list[tuple[TensorProto, TensorProto]] = []
    for tensor in inits:
        new = copy.graph.initializer.add()
        if take(tensor):
            new.name, new.data_type = tensor.name, tensor.data_type
            new.dims.extend(tensor.dims)
            new.doc_string = tensor.doc_string
            moved.append((new, tensor))
        else:
            new.CopyFrom(tensor)
    return copy, moved


def _point(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)),
                       ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


def model_payloads(
    model: onnx.ModelProto, path: Path, folder: Path | None = None
) -> list[tuple[Path, Payload]]:
    """What to write for ``model`` at ``path`` (for :func:`qmpass.modelio.write_all_atomic`):
    the model alone when it holds all its tensors and is under 2 GB; else the model and
    :func:`data_path` beside it, holding every external tensor (read from ``folder``,
    default :func:`current_folder`) and every initializer of ``EXTERNAL_THRESHOLD`` bytes
    or more, streamed into the file one tensor at a time. ``model`` is not changed."""
    folder = folder if folder is not None else current_folder()
    if not external_tensors(model) and embedded_bytes(model) < PROTOBUF_LIMIT // 2:
        return [(path, model.SerializeToString())]
    data = data_path(path)
    copy, moved = skeleton(model, large_embedded)
    sources: list[tuple[int, _Place | TensorProto]] = []
    offset = 0

    def place(tensor: TensorProto, source: _Place | TensorProto, length: int) -> None:
        nonlocal offset
        _point(tensor, data.name, offset, length)
        sources.append((offset, source))
        offset += length + (-length) % 4096  # page-aligned: onnxruntime maps them

    for tensor in external_tensors(copy):  # before the moved ones become external
        found = _place(tensor, folder)
        length = found.length if found.length >= 0 else (_nbytes(tensor) or 0)
        place(tensor, _Place(found.path, found.offset, length), length)
    for new, original in moved:
        place(new, original, _nbytes(original) or 0)

    def write(handle: BinaryIO) -> None:
        for start, source in sources:
            handle.seek(start)
            if isinstance(source, TensorProto):
                handle.write(_raw_bytes(source))
                continue
            with source.path.open("rb") as stream:
                stream.seek(source.offset)
                left = source.length
                while left > 0:
                    chunk = stream.read(min(left, 64 * 2**20))
                    if not chunk:
                        raise OSError(f"{source.path} ended early while copying from it")
                    handle.write(chunk)
                    left -= len(chunk)
        handle.truncate(offset)

    return [(path, copy.SerializeToString()), (data, write)]


def _raw_bytes(tensor: TensorProto) -> bytes:
    """The raw little-endian bytes of an embedded tensor (``raw_data`` or typed fields)."""
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data


def embedded_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the tensor data the proto itself holds (from types and shapes:
    ``ByteSize`` wraps around past 4 GB)."""
    return sum(_nbytes(t) or 0 for t in _all_tensors(model) if not is_external(t))


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all the model's tensor data, held in the proto or in external files."""
    return sum(_nbytes(t) or 0 for t in _all_tensors(model))


def large_embedded(tensor: TensorProto) -> bool:
    """An initializer held in the proto, of ``EXTERNAL_THRESHOLD`` bytes or more."""
    return not is_external(tensor) and (_nbytes(tensor) or 0) >= EXTERNAL_THRESHOLD


def embedded(model: onnx.ModelProto, folder: Path | None = None) -> onnx.ModelProto:
    """``model`` with its external tensors read into it (from ``folder``, default
    :func:`current_folder`) when the whole stays under 2 GB; else ``model`` itself."""
    external = external_tensors(model)
    if not external:
        return model
    size = embedded_bytes(model) + sum(_nbytes(t) or 0 for t in external)
    if size >= PROTOBUF_LIMIT // 2:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in external_tensors(copy):
        tensor.raw_data = np.ascontiguousarray(tensor_array(tensor, folder)).tobytes()
        del tensor.external_data[:]
        tensor.data_location = TensorProto.DEFAULT
    return copy


def data_path(path: Path) -> Path:
    """Where :func:`model_payloads` puts the external data of a model written at ``path``."""
    return path.with_name(path.name + ".data")


def without_external(model: onnx.ModelProto, large: bool = False) -> onnx.ModelProto:
    """For ``onnx.checker`` in memory: ``model`` itself if it has no external tensor (nor,
    with ``large``, an initializer of ``EXTERNAL_THRESHOLD`` bytes or more), else a copy
    without those tensors' data: they become graph inputs of the same type and shape (the
    checker would look for external files in the working directory; it serialises what
    it checks, which for a model's own rewrite would hold its weights twice more)."""
    def take(tensor: TensorProto) -> bool:
        return is_external(tensor) or (large and large_embedded(tensor))

    if not any(take(t) for t in model.graph.initializer):
        return model
    copy, moved = skeleton(model, take)
    names = {original.name for _, original in moved}
    kept = [t for t in copy.graph.initializer if t.name not in names]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(kept)
    listed = {i.name for i in copy.graph.input}  # (an input with a default value)
    copy.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for _, t in moved if t.name not in listed)
    return copy
