"""Per-operator work on several cores or a Dask cluster: :class:`Executor`.

One abstraction: ``Executor.map(fn, tasks)`` calls ``fn(*task)`` for independent tasks and
returns the results *in task order*, whatever order they finished in, so a parallel run
gives the serial run's results (each task is the same computation on the same arrays).

* ``jobs=1`` (and no scheduler): a plain loop, nothing started.
* ``jobs=N``: a :class:`~concurrent.futures.ThreadPoolExecutor` of N threads. The tasks
  are LAPACK/BLAS eigendecompositions, which release the GIL, so threads run them side by
  side without copying a single array (processes would pickle every weight).
* ``scheduler="tcp://host:port"``: a ``dask.distributed`` Client of an existing cluster.

What a Dask task carries. Tasks name their operators: every
:class:`~qmpass.extract.Operator` argument (alone, or in a list or tuple) becomes an
:class:`OperatorRef` (the model file's path, the operator's name, and a BLAKE2 digest of
its shape, bias and a sample of its weight's rows) when the model was read from a file
(``source``). The worker loads that file itself with :func:`qmpass.modelio.load_model` and
:func:`qmpass.extract.extract_operators` (once per worker process and file version: the
files must be on storage the workers share, at the same path), checks the digest, and
runs ``fn`` on its own copy of the operator. Everything else in a task is sent as it is:
the method name, and for data-aware plans the calibration statistics (an input
covariance, ``d_in x d_in``, which is not in the model file). A model that lives only in
memory (an ``onnx.ModelProto``) has no file to read: its operators, weights included, are
pickled into the tasks. Results always travel back through Dask's ordinary channel
(pickled; a low-rank candidate includes its projection and the members its variants
rebuild from, weights included).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import numpy as np

from qmpass.errors import QmpassInputError
from qmpass.extract import Operator
from qmpass.modelio import LoadedModel

__all__ = ["CONNECT_TIMEOUT", "Executor", "OperatorRef", "check_parallel", "model_file"]

T = TypeVar("T")

#: seconds to wait for a Dask scheduler before giving up with a QmpassInputError
CONNECT_TIMEOUT = 5.0


def check_parallel(jobs: object, scheduler: object) -> None:
    """The configs' validation of ``jobs`` and ``scheduler`` (QmpassInputError). Whether
    the scheduler answers is checked when the work starts (:class:`Executor`)."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise QmpassInputError(f"--jobs must be a positive integer, got {jobs!r}.")
    if scheduler is not None and (not isinstance(scheduler, str) or not scheduler.strip()):
        raise QmpassInputError(
            f"--scheduler must be a Dask scheduler address such as tcp://127.0.0.1:8786, "
            f"got {scheduler!r}."
        )


def model_file(loaded: LoadedModel) -> Path | None:
    """The file ``loaded`` was read from (what Dask workers read too); None in memory."""
    return loaded.files[0] if loaded.files else None


@dataclass(frozen=True)
class OperatorRef:
    """An operator as a Dask task names it: read from ``path`` on the worker."""

    path: str
    name: str
    digest: str


#: rows of a weight (evenly spaced, the last one included) its digest reads
DIGEST_ROWS = 64


def _digest(op: Operator) -> str:
    """A BLAKE2 digest of the operator's shape, bias and ``DIGEST_ROWS`` rows of its
    weight, as float64 in row-major order: the same on the client and on a worker whether
    the weight is held as its stored memory map or as a float64 conversion. Reading every
    weight whole took the 1.1B decoder's client 15 s before its first task and each task
    a converted copy of its weight again."""
    h = hashlib.blake2b(digest_size=16)
    weight = op.stored_weight
    rows = weight.shape[0]
    sample = np.unique(np.linspace(0, max(rows - 1, 0), DIGEST_ROWS).astype(int))[:rows]
    for array in (weight[sample], op.bias):
        if array is not None:
            a = np.asarray(array, dtype=np.float64, order="C")
            h.update(str(a.shape).encode())
            h.update(a.data)
    h.update(str(weight.shape).encode())
    return h.hexdigest()


class Executor:
    """Maps a function over independent tasks: serially, on ``jobs`` threads, or on the
    Dask cluster at ``scheduler`` (which wins over ``jobs``). A context manager: leaving
    it shuts the pool down or closes the Dask client (the cluster stays up)."""

    def __init__(self, jobs: int = 1, scheduler: str | None = None,
                 timeout: float | None = None) -> None:
        check_parallel(jobs, scheduler)
        self.jobs = jobs
        self.scheduler = scheduler
        self._pool: ThreadPoolExecutor | None = None
        self._client: Any = None
        if scheduler is not None:
            self._client = _connect(scheduler, CONNECT_TIMEOUT if timeout is None else timeout)
        elif jobs > 1:
            self._pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="qmpass")

    @property
    def parallel(self) -> bool:
        return self._pool is not None or self._client is not None

    def map(
        self,
        fn: Callable[..., T],
        tasks: Sequence[tuple[Any, ...]],
        source: str | os.PathLike[str] | None = None,
        on_done: Callable[[], object] | None = None,
    ) -> list[T]:
        """``[fn(*task) for task in tasks]``, in order. ``source``: the model file the
        tasks' operators were extracted from (a Dask worker reads them there; None: they
        are sent). ``on_done`` is called in this thread once per finished task."""
        if not tasks:
            return []
        if self._client is not None:
            return self._map_dask(fn, tasks, source, on_done)
        if self._pool is None or len(tasks) == 1:
            results = []
            for task in tasks:
                results.append(fn(*task))
                if on_done is not None:
                    on_done()
            return results
        futures = [self._pool.submit(fn, *task) for task in tasks]
        for _ in as_completed(futures):
            if on_done is not None:
                on_done()
        return [f.result() for f in futures]

    def _map_dask(self, fn: Callable[..., T], tasks: Sequence[tuple[Any, ...]],
                  source: str | os.PathLike[str] | None,
                  on_done: Callable[[], object] | None) -> list[T]:
        from distributed import as_completed as dask_completed

        path = None if source is None else str(Path(source).resolve())
        sent = [tuple(_named(arg, path) for arg in task) for task in tasks]
        futures = [self._client.submit(_run_named, fn, task, pure=False) for task in sent]
        try:
            for _ in dask_completed(futures, loop=self._client.loop):
                if on_done is not None:
                    on_done()
            return list(self._client.gather(futures))
        finally:
            for f in futures:
                f.release()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _connect(address: str, timeout: float) -> Any:
    try:
        from distributed import Client
    except ImportError as exc:  # a dependency, but an environment may lack it
        raise QmpassInputError(
            "--scheduler needs dask.distributed (pip install 'dask[distributed]')."
        ) from exc
    try:
        return Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        raise QmpassInputError(
            f"no Dask scheduler answered at {address} within {timeout:g} s "
            f"({type(exc).__name__}); start one (dask scheduler) or drop --scheduler."
        ) from exc


def _named(arg: Any, path: str | None) -> Any:
    if path is None:
        return arg
    if isinstance(arg, Operator):
        return OperatorRef(path, arg.name, _digest(arg))
    if isinstance(arg, list | tuple) and arg and all(isinstance(a, Operator) for a in arg):
        return type(arg)(OperatorRef(path, a.name, _digest(a)) for a in arg)
    return arg


def _run_named(fn: Callable[..., T], task: tuple[Any, ...]) -> T:
    """On the worker: operators named by reference are read from their file, then ``fn``."""
    return fn(*(_resolved(arg) for arg in task))


def _resolved(arg: Any) -> Any:
    if isinstance(arg, OperatorRef | Operator):
        return _operator(arg)
    if isinstance(arg, list | tuple) and arg and all(
            isinstance(a, OperatorRef | Operator) for a in arg):
        return type(arg)(_operator(a) for a in arg)
    return arg


def _fresh(array: np.ndarray | None) -> np.ndarray | None:
    if array is None:
        return None
    return np.array(array)


_CACHE: dict[tuple[str, int, int], dict[str, Operator]] = {}
_CACHE_LOCK = threading.Lock()
_CACHE_FILES = 2  # model versions a worker keeps


def _operators(path: str) -> dict[str, Operator]:
    """The operators of the model file at ``path``, extracted once per worker process
    (keyed by the file's modification time and size, so a rewritten file is read again)."""
    from qmpass.extdata import data_folder
    from qmpass.extract import extract_operators
    from qmpass.modelio import load_model

    stat = os.stat(path)
    key = (path, stat.st_mtime_ns, stat.st_size)
    with _CACHE_LOCK:  # one extraction per file even when the worker runs tasks on threads
        if key not in _CACHE:
            loaded = load_model(path)
            with data_folder(loaded.folder):
                extraction = extract_operators(loaded.proto, loaded.external)
            while len(_CACHE) >= _CACHE_FILES:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = {op.name: op for op in extraction.operators}
        return _CACHE[key]


def _operator(ref: OperatorRef | Operator) -> Operator:
    if isinstance(ref, Operator):  # sent whole: its arrays in fresh memory, as the serial
        # run has them (unpickled buffers can be unaligned, and BLAS kernels then round
        # differently)
        return replace(ref, weight=np.array(ref.weight), bias=_fresh(ref.bias))
    op = _operators(ref.path).get(ref.name)
    if op is None or _digest(op) != ref.digest:
        raise RuntimeError(
            f"the worker read {ref.path} and found operator {ref.name} "
            f"{'missing' if op is None else 'with other weights'}: the workers must see "
            "the same model file as the client (shared storage, same path)."
        )
    return op
