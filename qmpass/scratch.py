"""A scratch file for the new weights of rewritten models too large to hold twice.

``compress`` of a model with external data rewrites it many times over (every plan
applied whole, rollbacks, probes), and each rewritten model holds new factors of about
the size of the weights. Within :func:`scratch_file`, :func:`qmpass.rewrite.base.new_constant`
writes each large new tensor once, in the model's element type, to a temporary file and
gives the graph a reference to it instead of the values (an external-data tensor whose
``location`` starts with :data:`MARKER`). So a rewritten model's proto stays small;
:func:`qmpass.extdata.tensor_array` (and so extraction, :class:`~qmpass.extdata.LazyArray`,
the writer of ``OUT.data``) reads those tensors from the scratch file through memory
maps, and onnxruntime gets them as arrays mapped from it (:mod:`qmpass.verify.runner`).

The file lives as long as the process (or until :func:`release`): a model ``compress``
returns may refer to it until it is written out.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

__all__ = ["MARKER", "SCRATCH_BYTES", "SPILLED", "Scratch", "active", "anchor", "release",
           "resolve", "scratch_file"]

#: the ``location`` prefix of a tensor in a scratch file (never a file name a model has:
#: inputs' locations must be plain relative paths, and this one is refused as one)
MARKER = "qmpass-scratch:"
#: new tensors at least this large (bytes) go to the scratch file
SCRATCH_BYTES = 1 << 20
#: the name of a scratch file, the location of the weights
#: :func:`qmpass.modelio.spill_embedded` moves there (the model's folder is then the file's)
SPILLED = "qmpass-scratch.data"

_ACTIVE: ContextVar[Scratch | None] = ContextVar("qmpass_scratch", default=None)
_FILES: dict[str, Path] = {}  # key -> file, of the scratch files alive
_LOCK = threading.Lock()


class Scratch:
    """One append-only scratch file in its own temporary folder (removed with it)."""

    def __init__(self) -> None:
        self.key = uuid.uuid4().hex
        folder = Path(tempfile.mkdtemp(prefix="qmpass-scratch-"))
        self.path = folder / SPILLED
        self.path.touch()
        self.kept = False  # whether a model that outlives the block refers to it
        self._lock = threading.Lock()
        with _LOCK:
            _FILES[self.key] = self.path
        weakref.finalize(self, _remove, self.key, folder)

    def put(self, name: str, array: np.ndarray, *, plain: bool = False) -> TensorProto:
        """``array`` appended (page-aligned) and a reference tensor named ``name``: to
        this scratch file wherever the model goes, or with ``plain`` an ordinary external
        tensor whose location is the file's name (:data:`SPILLED`), in its folder."""
        data = np.ascontiguousarray(array)
        with self._lock, self.path.open("ab") as handle:
            offset = handle.tell()
            offset += (-offset) % 4096
            handle.truncate(offset)
            handle.seek(offset)
            handle.write(data.tobytes())
        tensor = TensorProto(name=name, dims=list(data.shape),
                             data_type=helper.np_dtype_to_tensor_dtype(data.dtype))
        tensor.data_location = TensorProto.EXTERNAL
        location = self.path.name if plain else f"{MARKER}{self.key}"
        for key, value in (("location", location), ("offset", str(offset)),
                           ("length", str(data.nbytes))):
            tensor.external_data.add(key=key, value=value)
        return tensor


def _remove(key: str, folder: Path) -> None:
    with _LOCK:
        _FILES.pop(key, None)
    shutil.rmtree(folder, ignore_errors=True)


_KEPT: list[Scratch] = []  # alive until release() or exit: returned models refer to them


@contextmanager
def scratch_file() -> Iterator[Scratch]:
    """Within the block, new large tensors go to a fresh scratch file; after it, the file
    is kept (until :func:`release` or exit) if the block set its ``kept``, else removed."""
    scratch = Scratch()
    token = _ACTIVE.set(scratch)
    try:
        yield scratch
    finally:
        _ACTIVE.reset(token)
        if scratch.kept:
            _KEPT.append(scratch)


def anchor(model: onnx.ModelProto, scratch: Scratch) -> bool:
    """Point ``model``'s references to :data:`SPILLED` (in ``scratch``) at ``scratch``
    wherever the model goes (as a rewrite's new tensors are), and keep the file until
    :func:`release` or exit if there are any: a returned model refers to it."""
    found = False
    for tensor in model.graph.initializer:
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == SPILLED:
                entry.value, found = f"{MARKER}{scratch.key}", True
    if found and scratch not in _KEPT:
        _KEPT.append(scratch)
    return found


def active() -> Scratch | None:
    """The scratch file new tensors go to, if a :func:`scratch_file` block is open."""
    return _ACTIVE.get()


def release() -> None:
    """Remove the scratch files of finished blocks (models referring to them no longer
    read: write them out first). An open block's file is not among them."""
    _KEPT.clear()


def resolve(location: str) -> Path | None:
    """The file of a scratch ``location``; None if it is not one (or was released)."""
    if not location.startswith(MARKER):
        return None
    with _LOCK:
        return _FILES.get(location[len(MARKER):])
