"""The byte-level LLaMA fixture (models/llama_text.py): it loads, runs in onnxruntime,
predicts held-out text far better than chance, and qmpass compresses it to a budget."""

from __future__ import annotations

import json

import numpy as np
import onnx

import models
from qmpass import CompressConfig, compress
from qmpass.verify import run_batched

NAME = "llama_text"


def test_llm_fixture_is_listed_apart_from_the_digit_fixtures() -> None:
    assert NAME in models.LLM_FIXTURES and NAME not in models.FIXTURES
    metadata = json.loads((models.MODELS_DIR / f"{NAME}.json").read_text())
    assert metadata["architecture"]["kv_heads"] < metadata["architecture"]["heads"]
    assert models.fixture_path(NAME).stat().st_size < 4 * 2**20


def test_llm_fixture_predicts_held_out_text_far_better_than_uniform_bytes() -> None:
    model = onnx.load(str(models.fixture_path(NAME)))
    x, y = models.load_llm_test(NAME)
    assert x.dtype == y.dtype == np.int64 and x.shape == y.shape
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # y is x shifted by one byte
    logits = run_batched(model, {"input": x[:8]})[0]
    assert logits.shape == (8, x.shape[1], 256)
    perplexity = models.perplexity(logits, y[:8])
    assert perplexity < 256 / 8  # a uniform guess over bytes scores 256


def test_compress_meets_the_budget_on_the_llm_fixture() -> None:
    original = onnx.load(str(models.fixture_path(NAME)))
    calib = {key: value[:16] for key, value in models.load_calib(NAME).items()}
    model, report = compress(original, CompressConfig(keep=0.6, calib=calib))
    assert abs(report.to_dict()["keep_achieved"] - 0.6) <= 0.03
    x, y = models.load_llm_test(NAME)
    logits = run_batched(model, {"input": x[:4]})[0]
    assert np.isfinite(logits).all() and logits.shape == (4, x.shape[1], 256)
    assert models.perplexity(logits, y[:4]) < 256 / 8
