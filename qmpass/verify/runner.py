"""Running models in onnxruntime: the only place qmpass talks to it."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort

__all__ = ["run_model", "session"]


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    """A CPU session for ``model`` (serialised in memory; nothing is written)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def run_model(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The outputs of ``model`` on ``feeds``, in graph output order."""
    return [np.asarray(out) for out in session(model).run(None, dict(feeds))]
