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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from qmpass.errors import QmpassInputError

__all__ = [
    "LoadedModel",
    "ModelLike",
    "caller_form",
    "check_outputs",
    "load_model",
    "stored_values",
    "write_all_atomic",
    "write_atomic",
]



@dataclass(frozen=True)
class LoadedModel:
    """A model with its external data in memory, and which tensors came from external files
    (loading rewrites their location, so it is recorded before)."""

    proto: onnx.ModelProto
    external: frozenset[str] = frozenset()
    files: tuple[Path, ...] = ()  # the model file and the external data files it read
    name: str = "model"  # the path it was read from, or the graph's name


ModelLike = str | os.PathLike[str] | onnx.ModelProto | LoadedModel


def load_model(model: ModelLike) -> LoadedModel:
    """Load ``model`` with its external data and check it with ``onnx.checker`` (full).

    A ModelProto is taken as it is (never copied or changed: analysis does not mutate); a
    LoadedModel is returned as it is (loaded and checked already).
    """
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, onnx.ModelProto):
        validate(model, "the model")
        return LoadedModel(model, name=model.graph.name or "model")
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
    external = frozenset(
        t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    )
    files = (path, *sorted({
        path.parent / entry.value
        for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
        for entry in t.external_data if entry.key == "location"
    }))
    try:
        onnx.load_external_data_for_model(proto, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise QmpassInputError(
            f"{path}: external data could not be read ({_first_line(exc)}); keep the data "
            "files beside the model."
        ) from exc
    validate(proto, str(path), path)  # the checker reads the file itself: any size
    return LoadedModel(proto, external, files, str(path))


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
        onnx.checker.check_model(model if path is None else str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        # the checker's messages run over several lines (a node dump): one line, cut short
        text = " ".join(str(exc).split())
        text = text if len(text) <= 240 else text[:237] + "..."
        raise QmpassInputError(f"{source}: not a valid ONNX model ({text}).") from exc


def caller_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself when its IR version is 4 or later; else a copy at IR 4 whose graph
    inputs are only those a caller feeds (IR < 4 also listed every initializer)."""
    if model.ir_version >= 4:
        return model
    stored = {t.name for t in model.graph.initializer}
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


def write_all_atomic(files: Sequence[tuple[str | os.PathLike[str], bytes | str]]) -> None:
    """Write every file through a temporary file beside it, then rename them all: a failure
    while writing leaves none of them."""
    written: list[tuple[str, Path]] = []
    try:
        for path, data in files:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            payload = data.encode() if isinstance(data, str) else data
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            written.append((tmp, target))
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        for tmp, target in written:
            os.replace(tmp, target)
    except BaseException:
        for tmp, _ in written:
            Path(tmp).unlink(missing_ok=True)
        raise


def stored_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and ``Constant`` node values of the main graph, by tensor name (the
    names channel groups give for weights)."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


_PROTOBUF_LIMIT = 2**31  # bytes of one serialised protobuf message


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
