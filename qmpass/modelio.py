"""Loading models and writing outputs.

Loading turns every way an ONNX file can be broken (not protobuf, truncated, missing
external data, NaN weights are checked later by extraction) into a
:class:`~qmpass.errors.QmpassInputError`. Writing is atomic: a temporary file in the
destination folder is renamed over the target, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from qmpass.errors import QmpassInputError

__all__ = ["LoadedModel", "ModelLike", "load_model", "stored_values", "write_atomic"]

ModelLike = str | os.PathLike[str] | onnx.ModelProto


@dataclass(frozen=True)
class LoadedModel:
    """A model with its external data in memory, and which tensors came from external files
    (loading rewrites their location, so it is recorded before)."""

    proto: onnx.ModelProto
    external: frozenset[str] = frozenset()


def load_model(model: ModelLike) -> LoadedModel:
    """Load ``model`` with its external data.

    A ModelProto is taken as it is (never copied or changed: analysis does not mutate).
    """
    if isinstance(model, onnx.ModelProto):
        return LoadedModel(model)
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
    try:
        onnx.load_external_data_for_model(proto, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise QmpassInputError(
            f"{path}: external data could not be read ({_first_line(exc)}); keep the data "
            "files beside the model."
        ) from exc
    return LoadedModel(proto, external)


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        os.replace(tmp, target)
    except BaseException:
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
