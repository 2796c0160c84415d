"""Trained ONNX fixtures for qmpass tests and benchmarks, and how to load them.

Each fixture `<name>` is stored here as `<name>.onnx` (weights embedded), `<name>.json`
(metadata: test accuracy, exporter, opset...), `<name>_test.npz` (held-out split,
keys `x` float32 in the model's input layout and `y` int64) and `<name>_calib.npz`
(training samples keyed by the graph input name). The builder scripts beside this
file regenerate them (`python models/build_all.py`).

The language-model fixture (`LLM_FIXTURES`, `models/llama_text.py`) is kept apart from
`FIXTURES`, whose users assume digit images: its inputs are int64 byte ids `(batch, 128)`,
its output next-byte logits; `load_llm_test` gives the held-out windows and their next
bytes, `load_calib` its calibration windows, `perplexity` the metric. It is rebuilt by
`python models/llama_text.py` (10-18 minutes; not part of build_all.py).

This module imports only numpy and pathlib so that tests can load fixtures in an
environment without torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = [
    "FIXTURES",
    "LLM_FIXTURES",
    "fixture_path",
    "load_calib",
    "load_llm_test",
    "load_test_split",
    "perplexity",
]

MODELS_DIR = Path(__file__).resolve().parent

FIXTURES: list[str] = [
    "mlp_digits",
    "resnet_digits",
    "resnet_digits_bn",
    "transformer_digits",
]

#: byte-level decoder-only language models (not in FIXTURES: their inputs are token ids)
LLM_FIXTURES: list[str] = ["llama_text"]


def _check(name: str) -> None:
    if name not in FIXTURES and name not in LLM_FIXTURES:
        known = ", ".join([*FIXTURES, *LLM_FIXTURES])
        raise KeyError(f"unknown fixture {name!r}; known: {known}")


def fixture_path(name: str) -> Path:
    """Return the path of the fixture's .onnx file."""
    _check(name)
    return MODELS_DIR / f"{name}.onnx"


def load_test_split(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return the held-out digits (x float32, y int64) in the fixture's input layout."""
    if name in LLM_FIXTURES:
        raise KeyError(f"{name!r} is a language model: use load_llm_test")
    _check(name)
    with np.load(MODELS_DIR / f"{name}_test.npz") as data:
        return data["x"], data["y"]


def load_calib(name: str) -> dict[str, np.ndarray]:
    """Return calibration inputs as a feed dict {graph input name: array} (float32
    images, or int64 byte ids for the language models)."""
    _check(name)
    with np.load(MODELS_DIR / f"{name}_calib.npz") as data:
        return {key: data[key] for key in data.files}


def load_llm_test(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return a language model's held-out windows: ids ``x`` and next bytes ``y``, both
    int64 ``(windows, context)`` (``y[:, t]`` is the byte after ``x[:, t]``)."""
    if name not in LLM_FIXTURES:
        raise KeyError(f"unknown language model {name!r}; known: {', '.join(LLM_FIXTURES)}")
    with np.load(MODELS_DIR / f"{name}_test.npz") as data:
        return data["x"], data["y"]


def perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    """``exp`` of the mean next-token cross-entropy (natural log) of ``logits``
    ``(..., vocab)`` against ``targets`` ``(...)``, over every position."""
    flat = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    top = flat.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(flat - top).sum(axis=1))
    picked = flat[np.arange(len(flat)), np.asarray(targets).reshape(-1)]
    return float(np.exp(np.mean(log_z - picked)))
