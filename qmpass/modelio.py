"""Loading models and writing outputs.

Loading turns every way an ONNX file can be broken (not protobuf, truncated, missing
external data, rejected by ``onnx.checker``; NaN weights are checked later by extraction)
into a :class:`~qmpass.errors.QmpassInputError`, the same way for every command. Writing
is atomic: temporary files in the destination folders are renamed over the targets once
all of them are written, so a failed run leaves nothing behind.

IR < 4 models (what older exporters and most of the ONNX Model Zoo wrote) must list every
initializer as a graph input too. No caller feeds those inputs, and a rewrite that
replaces a weight could not keep its input; :func:`caller_form` turns such a model into
IR 4 without them, which is what ``compress`` writes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper

from qmpass import scratch
from qmpass.errors import QmpassInputError
from qmpass.extdata import (
    Payload,
    check_external,
    current_folder,
    embedded_bytes,
    external_tensors,
    is_external,
    skeleton,
    tensor_array,
    without_external,
)
from qmpass.scratch import Scratch

__all__ = [
    "LoadedModel",
    "ModelLike",
    "StoredValues",
    "caller_form",
    "check_outputs",
    "load_model",
    "spill_embedded",
    "stored_values",
    "write_all_atomic",
    "write_atomic",
]



@dataclass(frozen=True)
class LoadedModel:
    """A model, and which of its initializers are in external files. Their data is not in
    ``proto`` (it keeps the references, relative to ``folder``): :mod:`qmpass.extdata`
    reads a tensor at a time, within ``data_folder(folder)``."""

    proto: onnx.ModelProto
    external: frozenset[str] = frozenset()
    files: tuple[Path, ...] = ()  # the model file and the external data files it reads
    name: str = "model"  # the path it was read from, or the graph's name
    folder: Path | None = None  # where external data locations point (None: in memory)
    #: read from a file by :func:`load_model`: no caller holds ``proto``, so edits that
    #: keep its meaning (:func:`caller_form`, naming nodes) are made on it, not on a copy
    #: of every weight
    owned: bool = False
    #: the scratch file its large initializers were moved to (:func:`spill_embedded`):
    #: alive as long as this is, the proto's references point into it
    spilled: Scratch | None = None


ModelLike = str | os.PathLike[str] | onnx.ModelProto | LoadedModel


def load_model(model: ModelLike, *, spill: bool = False) -> LoadedModel:
    """Load ``model`` with its external data and check it with ``onnx.checker`` (full).

    A ModelProto is taken as it is (never copied or changed: analysis does not mutate); a
    LoadedModel is returned as it is (loaded and checked already). With ``spill``, a
    file's large embedded weights go to a scratch file first (:func:`spill_embedded`),
    before the checker reads the file again.
    """
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, onnx.ModelProto):
        if external_tensors(model) and current_folder() is None:
            raise QmpassInputError(
                "the model refers to external data files but was given in memory; give its "
                "path so that they can be found.")
        validate(model, "the model")
        external = frozenset(t.name for t in model.graph.initializer if is_external(t))
        return LoadedModel(model, external, name=model.graph.name or "model",
                           folder=current_folder() if external else None)
    path = Path(model)
    if not path.is_file():
        raise QmpassInputError(f"{path}: no such file.")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError) as exc:
        raise QmpassInputError(f"{path}: not a readable ONNX model ({_first_line(exc)}).") from exc
    if not proto.graph.node and not proto.graph.initializer:
        # protobuf happily parses many byte strings (an empty file, a truncated header) as
        # an empty message: a model without a single node is not one we were meant to read.
        raise QmpassInputError(f"{path}: not an ONNX model (it holds no graph).")
    external = frozenset(t.name for t in proto.graph.initializer if is_external(t))
    # external data stays in its files (read a tensor at a time, see qmpass.extdata): the
    # locations must stay in the model's folder and every tensor's bytes must be there
    files = (path, *check_external(proto, path.parent.resolve(), str(path)))
    loaded = LoadedModel(proto, external, files, str(path), path.parent.resolve(), owned=True)
    del proto
    if spill:  # (not held with the checker's own copy)
        loaded = spill_embedded(loaded)
    validate(loaded.proto, str(path), path)  # the checker reads the file itself: any size
    return loaded


#: weights held in a loaded proto past which :func:`spill_embedded` moves them out
SPILL_BYTES = 256 << 20


def spill_embedded(loaded: LoadedModel) -> LoadedModel:
    """``loaded`` with its large weights moved to a scratch file, when it was read from a
    file, holds its weights in the proto and they reach :data:`SPILL_BYTES`; else
    ``loaded`` itself. The new proto refers to them as ordinary external data in the
    scratch file's folder (``folder``), so they are read through memory maps, and
    onnxruntime maps them, as it does any external data. Drop the old ``loaded``: its
    proto holds every weight (protobuf frees a message's memory only with the message).

    The proto of a model like VGG-19 holds 0.55 GB of weights, and every onnxruntime
    session made from it serialises them and copies them again. ``compress`` puts the
    weights back into its output when the input held them (:mod:`qmpass.scratch`)."""
    if not loaded.owned or loaded.spilled is not None or external_tensors(loaded.proto) \
            or embedded_bytes(loaded.proto) < SPILL_BYTES:
        return loaded
    file = Scratch()
    proto, moved = skeleton(loaded.proto, _spillable)
    for new, original in moved:
        try:
            value = numpy_helper.to_array(original)
        except (ValueError, TypeError):  # malformed data: left for the checker to refuse
            new.CopyFrom(original)
            continue
        doc = original.doc_string
        new.CopyFrom(file.put(original.name, value, plain=True))
        new.doc_string = doc
    return replace(loaded, proto=proto, spilled=file, folder=file.path.parent)


def _spillable(tensor: onnx.TensorProto) -> bool:
    """A floating-point initializer held in the proto, of ``SCRATCH_BYTES`` or more."""
    if is_external(tensor) or tensor.data_type not in _SPILLED:
        return False
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return itemsize * int(np.prod(tensor.dims, dtype=np.int64)) >= scratch.SCRATCH_BYTES


#: the element types :func:`spill_embedded` moves (the weights)
_SPILLED = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                      onnx.TensorProto.DOUBLE})


def validate(model: onnx.ModelProto, source: str, path: Path | None = None) -> None:
    """Refuse a model that ``onnx.checker`` (with strict shape inference) rejects: a cycle,
    duplicate outputs or initializers, an undefined input, an unknown op, a bad IR
    version, shapes that contradict their ops. With the model's ``path`` the checker reads
    the file (external data files are checked beside it, not read), so size is no limit."""
    if model.ir_version < 3:
        raise QmpassInputError(
            f"{source}: IR version {model.ir_version} is not a valid ONNX model version (3 or "
            "later; the file may not be an ONNX model)."
        )
    if path is None and model.ByteSize() >= _PROTOBUF_LIMIT:  # in memory with its weights:
        return  # the checker cannot take a message protobuf cannot serialise
    try:
        onnx.checker.check_model(without_external(model) if path is None else str(path),
                                 full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        # the checker's messages run over several lines (a node dump): one line, cut short
        text = " ".join(str(exc).split())
        text = text if len(text) <= 240 else text[:237] + "..."
        raise QmpassInputError(f"{source}: not a valid ONNX model ({text}).") from exc


def caller_form(model: onnx.ModelProto, *, in_place: bool = False) -> onnx.ModelProto:
    """``model`` itself when its IR version is 4 or later; else a copy (``model`` itself,
    ``in_place``) at IR 4 whose graph inputs are only those a caller feeds (IR < 4 also
    listed every initializer)."""
    if model.ir_version >= 4:
        return model
    stored = {t.name for t in model.graph.initializer}
    upgraded = model
    if not in_place:
        upgraded = onnx.ModelProto()
        upgraded.CopyFrom(model)
    upgraded.ir_version = 4
    fed = [v for v in model.graph.input if v.name not in stored]
    del upgraded.graph.input[:]
    upgraded.graph.input.extend(fed)
    return upgraded


def check_outputs(
    files: Mapping[str, Path | None],
    inputs: Sequence[Path],
    folders: Mapping[str, Path | None] | None = None,
) -> None:
    """Refuse, before any work, output paths that cannot be written or would destroy
    something: an output that is one of the ``inputs`` or another output, a file output
    that is a folder (or a folder output that is a file), a parent that is a file, a
    folder that cannot be written. Keys are the flags that named the paths."""
    sources = {p.resolve(): p for p in inputs}
    taken: dict[Path, str] = {}
    wanted = [(flag, path, False) for flag, path in files.items()] + [
        (flag, path, True) for flag, path in (folders or {}).items()]
    for flag, path, folder in wanted:
        if path is None:
            continue
        real = path.resolve()
        if real in sources:
            raise QmpassInputError(f"{flag} {path} is an input of this command "
                                   f"({sources[real]}); write the output elsewhere.")
        if real in taken:
            raise QmpassInputError(f"{flag} {path} is also {taken[real]}; give each output "
                                   "its own path.")
        taken[real] = flag
        if folder and any(source.is_relative_to(real) for source in sources):
            raise QmpassInputError(f"{flag} {path} holds an input of this command; write the "
                                   "output elsewhere.")
        if folder and path.exists() and not path.is_dir():
            raise QmpassInputError(f"{flag} {path} is a file; give a folder.")
        if not folder and path.is_dir():
            raise QmpassInputError(f"{flag} {path} is a folder; give a file path.")
        ancestor = real.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise QmpassInputError(f"{flag} {path}: {ancestor} is a file, not a folder.")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise QmpassInputError(f"{flag} {path}: the folder {ancestor} is not writable.")


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    write_all_atomic([(path, data)])


def write_all_atomic(files: Sequence[tuple[str | os.PathLike[str], Payload]]) -> None:
    """Write every file through a temporary file beside it, then rename them all: a failure
    while writing leaves none of them. A payload is bytes, text, or a function that writes
    into the open (binary) file, for data too large to hold in memory."""
    written: list[tuple[str, Path]] = []
    try:
        for path, data in files:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            written.append((tmp, target))
            with os.fdopen(fd, "wb") as handle:
                if callable(data):
                    data(handle)
                else:
                    handle.write(data.encode() if isinstance(data, str) else data)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        for tmp, target in written:
            os.replace(tmp, target)
    except BaseException:
        for tmp, _ in written:
            Path(tmp).unlink(missing_ok=True)
        raise


def stored_values(model: onnx.ModelProto) -> Mapping[str, np.ndarray]:
    """Initializers and ``Constant`` node values of the main graph, by tensor name (the
    names channel groups give for weights). Read when looked up (external data through a
    memory map, from the folder of :func:`qmpass.extdata.data_folder` when it was made),
    so holding the mapping holds no weight."""
    return StoredValues(model, current_folder())


class StoredValues(Mapping[str, np.ndarray]):
    """The mapping of :func:`stored_values`: each lookup reads the tensor again."""

    def __init__(self, model: onnx.ModelProto, folder: Path | None) -> None:
        self._folder = folder
        self._tensors: dict[str, onnx.TensorProto] = {
            t.name: t for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        self._tensors[node.output[0]] = attr.t

    def __getitem__(self, name: str) -> np.ndarray:
        return tensor_array(self._tensors[name], self._folder)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


_PROTOBUF_LIMIT = 2**31  # bytes of one serialised protobuf message


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
