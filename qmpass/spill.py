"""Arrays parked on disk while nobody uses them: calibration covariances of a model too
large for all of them to stay in memory (a 1.1B-parameter decoder has 7.8 GB of them in
float64).

A :class:`Spilled` array is written once to a temporary ``.npy`` file and read back by
:meth:`Spilled.load` each time its field is read (an object holding it installs the
:class:`ArrayField` descriptor). While a loaded copy is in use, loading again returns that
same copy (a weak cache), so identity-keyed caches downstream keep working; once nobody
holds it, it is freed. The file is removed when the :class:`Spilled` that wrote it is
garbage collected; a pickled copy (a Dask task) reads the same file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

__all__ = ["PARK_BYTES", "ArrayField", "Parked", "Spilled"]

_LOADED: weakref.WeakValueDictionary[str, np.ndarray] = weakref.WeakValueDictionary()
_LOCK = threading.RLock()  # re-entrant: _remove may run from the garbage collector inside load


class Spilled:
    """``array`` in a temporary file (read-only copies come back from :meth:`load`)."""

    def __init__(self, array: np.ndarray) -> None:
        handle, self.path = tempfile.mkstemp(prefix="qmpass-", suffix=".npy")
        with os.fdopen(handle, "wb") as file:
            np.save(file, array, allow_pickle=False)
        weakref.finalize(self, _remove, self.path)

    def load(self) -> np.ndarray:
        with _LOCK:
            found = _LOADED.get(self.path)
            if found is not None:
                return found
        array = np.load(self.path, allow_pickle=False)
        array.setflags(write=False)
        with _LOCK:
            return _LOADED.setdefault(self.path, array)

    def __getstate__(self) -> dict[str, object]:
        return dict(self.__dict__)  # the copy has no finalizer: the writer owns the file


def _remove(path: str) -> None:
    with _LOCK:  # a later file of the same name must not find this one's copy
        _LOADED.pop(path, None)
    with contextlib.suppress(OSError):
        os.remove(path)


class ArrayField:
    """A dataclass field holding an array or something with a ``load()`` method (a
    :class:`Spilled` array, an external tensor) that is read each time the field is; the
    stored form is what is pickled. Install with ``setattr(cls, name, ArrayField(name))``
    after the dataclass is made."""

    def __init__(self, name: str) -> None:
        self.slot = f"_{name}"

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        if obj is None:
            raise AttributeError(self.slot[1:])
        value = obj.__dict__[self.slot]
        return value if isinstance(value, np.ndarray) or not hasattr(value, "load") \
            else value.load()

    def __set__(self, obj: object, value: Any) -> None:
        obj.__dict__[self.slot] = value


#: arrays at least this large (bytes) wait on disk in a :class:`Parked` mapping
PARK_BYTES = 16 << 20


class Parked(Mapping[str, np.ndarray]):
    """Named arrays, the large ones (``PARK_BYTES``) waiting on disk until read: a plan's
    new weights, kept between planning and the rewrites (a 1.1B-parameter decoder's are
    several GB in float64)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self._stored: dict[str, np.ndarray | Spilled] = {
            name: Spilled(array) if array.nbytes >= PARK_BYTES else array
            for name, array in arrays.items()}

    def __getitem__(self, name: str) -> np.ndarray:
        value = self._stored[name]
        return value.load() if isinstance(value, Spilled) else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._stored)

    def __len__(self) -> int:
        return len(self._stored)
