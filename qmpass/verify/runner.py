"""Running models in onnxruntime: the only place qmpass talks to it.

Models are serialised in memory and handed to onnxruntime as bytes; nothing is written.
Tensors in external files stay there: onnxruntime reads them from the folder of
:func:`qmpass.extdata.data_folder` (the model's). Protobuf cannot serialise a message over
2 GB, so a model whose embedded tensors pass ``_IN_MEMORY_LIMIT`` is handed over without
its large initializers, which go to onnxruntime as arrays (``add_external_initializers``).

Batched runs split the feeds along axis 0 when every graph input has a dynamic first
dimension and all feeds agree on its length: that is the batch of an exported inference
graph, and its samples are computed independently. If an output of a batch does not have
the batch length on axis 0 (the graph reduces over the batch), the feeds are run once,
whole. Models with a static first dimension are always run once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from qmpass import heap
from qmpass.extdata import (
    current_folder,
    embedded_bytes,
    in_scratch,
    large_embedded,
    skeleton,
    tensor_array,
    tensor_bytes,
)
from qmpass.extract.shapes import infer_types

__all__ = [
    "DEFAULT_BATCH",
    "ORT_ERRORS",
    "run_batched",
    "run_model",
    "session",
    "session_with_tensors",
]

#: what onnxruntime raises when it cannot load or run a model: its own exception types,
#: and RuntimeError from its Python binding for element types numpy lacks (bfloat16)
ORT_ERRORS: tuple[type[Exception], ...] = (*(
    value for value in vars(ort.capi.onnxruntime_pybind11_state).values()
    if isinstance(value, type) and issubclass(value, Exception)
), RuntimeError)

#: samples per onnxruntime call in batched runs; bounds the memory of activations
DEFAULT_BATCH = 64


def session(model: onnx.ModelProto, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session for ``model`` (serialised in memory; nothing is written);
    ``threads``: onnxruntime's intra-op threads (None: its default, every core)."""
    return _session(model, b"", ort.GraphOptimizationLevel.ORT_ENABLE_ALL, threads)


def session_from_bytes(
    data: bytes, level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    arrays: Mapping[str, np.ndarray] | None = None,
    threads: int | None = None,
    prepack: bool = True,
) -> ort.InferenceSession:
    """A CPU session for a serialised model, with all graph optimisations by default;
    ``arrays`` are initializers handed over in memory (the model holds them as
    placeholders). External data is read from :func:`qmpass.extdata.current_folder`.
    ``prepack`` False keeps onnxruntime from copying MatMul weights into its packed
    layout (a second copy of a large model's weights)."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: a refusal is one line of ours on stderr
    options.graph_optimization_level = level
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if threads is not None:  # timing: one thread measures work, not scheduling
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    folder = current_folder()
    if folder is not None:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(folder))
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in (arrays or {}).values()]
    if values:
        options.add_external_initializers(list(arrays or {}), values)
    sess = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    sess._qmpass_arrays = values  # type: ignore[attr-defined]  # alive as long as it is
    return sess


def _session(model: onnx.ModelProto, extra: bytes, level: ort.GraphOptimizationLevel,
             threads: int | None = None) -> ort.InferenceSession:
    """``model`` (followed by the serialised ``extra``, merged into it) in a session; a
    model too large for one protobuf message hands its large initializers over as arrays,
    and new tensors in a scratch file (:mod:`qmpass.scratch`) go over as maps of it."""
    scratch = any(in_scratch(t) for t in model.graph.initializer)
    large = embedded_bytes(model) >= _IN_MEMORY_LIMIT
    weights = tensor_bytes(model)
    prepack = weights < _PREPACK_LIMIT
    if weights >= _TRIM_LIMIT:  # what the last session (or planning) left free in the
        heap.trim()  # heap goes back first: this one may hold every weight again
    if not scratch and not large:
        return session_from_bytes(model.SerializeToString() + extra, level, threads=threads,
                                  prepack=prepack)
    copy, moved = skeleton(model, lambda t: in_scratch(t) or (large and large_embedded(t)))
    arrays = {}
    for placeholder, original in moved:  # a scratch tensor as a map of its file
        arrays[original.name] = tensor_array(original)
        del placeholder.external_data[:]
        placeholder.data_location = TensorProto.EXTERNAL
        placeholder.external_data.add(key="location", value="qmpass-in-memory")
        placeholder.external_data.add(key="length", value=str(arrays[original.name].nbytes))
    return session_from_bytes(copy.SerializeToString() + extra, level, arrays, threads, prepack)


#: serialised size past which large initializers go to onnxruntime as arrays
_IN_MEMORY_LIMIT = 2**30
#: weights past which onnxruntime does not prepack them (a copy of every MatMul weight)
_PREPACK_LIMIT = 2**30
#: weights past which the heap is trimmed before a session is made (:mod:`qmpass.heap`):
#: on the 61.5M-parameter LLaMA layout, 0.2 GB less resident in every session after
#: planning
_TRIM_LIMIT = 64 << 20


def session_with_tensors(model: onnx.ModelProto, names: Sequence[str]) -> ort.InferenceSession:
    """A session for ``model`` that can also fetch the intermediate tensors ``names``."""
    outputs = {o.name for o in model.graph.output}
    extra = [name for name in names if name not in outputs]
    types = infer_types(model, extra)
    # A serialised message followed by another is parsed as their merge (repeated fields
    # appended), so this is the model with extra outputs, without copying the proto.
    addition = onnx.ModelProto(graph=onnx.GraphProto(output=[
        helper.make_tensor_value_info(name, types.get(name, TensorProto.FLOAT), None)
        for name in extra
    ]))
    # basic optimisations only (constant folding): the tensors must be what the graph
    # says, not what a fused kernel makes of them (QDQ fusion quantizes the activations)
    return _session(model, addition.SerializeToString(),
                    ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)


def run_model(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The outputs of ``model`` on ``feeds``, in graph output order."""
    return [np.asarray(out) for out in session(model).run(None, dict(feeds))]


def run_batched(
    model_or_session: onnx.ModelProto | ort.InferenceSession,
    feeds: Mapping[str, np.ndarray],
    batch: int = DEFAULT_BATCH,
    outputs: Sequence[str] | None = None,
) -> list[np.ndarray]:
    """The outputs (all, or those named in ``outputs``, in that order) on ``feeds``,
    computed ``batch`` samples at a time where the model has a dynamic batch dimension
    (see the module docstring), else in one run."""
    sess = (
        model_or_session
        if isinstance(model_or_session, ort.InferenceSession)
        else session(model_or_session)
    )
    names = list(outputs) if outputs is not None else None
    chunks = list(feed_batches(sess, feeds, batch))
    if len(chunks) == 1:
        return [_output(out) for out in sess.run(names, chunks[0])]
    parts: list[list[np.ndarray]] = []
    for chunk in chunks:
        result = [_output(out) for out in sess.run(names, chunk)]
        samples = _samples(chunk)
        if any(isinstance(out, list) or out.ndim == 0 or out.shape[0] != samples
               for out in result):
            # an output does not carry the batch on axis 0: the samples are not independent
            return [_output(out) for out in sess.run(names, dict(feeds))]
        parts.append(result)
    return [np.concatenate(column, axis=0) for column in zip(*parts, strict=True)]


def _output(value: Any) -> Any:
    """An onnxruntime output: a tensor as an array; a sequence (a list) stays a list."""
    return [np.asarray(v) for v in value] if isinstance(value, list) else np.asarray(value)


def batch_size(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> int | None:
    """The common axis-0 length of ``feeds`` if the model's inputs all have a dynamic
    first dimension (so that the feeds may be split), else None."""
    lengths: set[int] = set()
    for meta in sess.get_inputs():
        shape = meta.shape
        if meta.name not in feeds:
            return None
        array = feeds[meta.name]
        if not shape or isinstance(shape[0], int) or np.ndim(array) == 0:
            return None
        lengths.add(int(np.shape(array)[0]))
    return lengths.pop() if len(lengths) == 1 else None


def feed_batches(
    sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray], batch: int
) -> Iterator[dict[str, np.ndarray]]:
    """``feeds`` split into batches of ``batch`` samples, or whole (see module docstring)."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, not {batch}")
    total = batch_size(sess, feeds)
    if total is None or total <= batch:
        yield dict(feeds)
        return
    batched = {meta.name for meta in sess.get_inputs()}  # not overridable initializers
    for start in range(0, total, batch):  # (a gated model's budget_level goes whole)
        yield {name: array[start:start + batch] if name in batched else array
               for name, array in feeds.items()}


def _samples(chunk: Mapping[str, np.ndarray]) -> int | None:
    lengths = {int(np.shape(a)[0]) for a in chunk.values() if np.ndim(a) > 0}
    return lengths.pop() if len(lengths) == 1 else None
