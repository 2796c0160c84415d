"""Shared machinery for the fixture builders: data, training, ONNX export, checks.

The fixtures exist to give qmpass weights with real structure: random matrices have
no low-rank structure, so results on them say nothing (see docs/DESIGN.md). Every builder
therefore trains on a real dataset (scikit-learn's bundled digits, so no download is
needed), exports with a real exporter, and checks the exported graph against torch
before anything is written to disk.

Everything here is deterministic: one fixed split, fixed seeds, deterministic
algorithms and a single thread, so that rerunning a builder reproduces its files.
"""

from __future__ import annotations

import collections
import io
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from qmpass.modelio import write_atomic

MODELS_DIR = Path(__file__).resolve().parent
SEED = 0
OPSET = 17
# onnxruntime 1.31 refuses IR versions above 13 (onnx 1.23 writes 14 by default).
MAX_IR_VERSION = 13
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
CALIB_SIZE = 64
# Largest accepted |onnxruntime - torch| on any logit of the test split.
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Split:
    """The fixed train/test split of the digits, in one model's input layout."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser settings; AdamW with a cosine schedule, tuned per model."""

    epochs: int
    lr: float
    weight_decay: float
    batch_size: int = 64


@dataclass(frozen=True)
class Export:
    """One ONNX file to produce from the trained model.

    `fold_batchnorm` picks the exporter mode: TrainingMode.EVAL lets the TorchScript
    exporter fold BatchNormalization into the preceding Conv (what most deployed
    graphs look like), TrainingMode.PRESERVE on a model in eval mode keeps the
    BatchNormalization nodes (inference form, training_mode=0), which is the graph
    qmpass has to see through when pruning channels.
    """

    name: str
    fold_batchnorm: bool = True


def load_split(layout: tuple[int, ...]) -> Split:
    """Return the digits split shared by all fixtures, reshaped to (N, *layout).

    Pixels are scaled from 0..16 to [0, 1]. The split is stratified with a fixed
    random_state so every model is trained and tested on the same samples.
    """
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=SEED, stratify=y
    )
    return Split(
        x_train.reshape(-1, *layout),
        y_train,
        x_test.reshape(-1, *layout),
        y_test,
    )


def seed_everything() -> None:
    """Make torch deterministic: fixed seed, deterministic kernels, one thread."""
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def train(model: nn.Module, split: Split, config: TrainConfig) -> float:
    """Train `model` in place with cross-entropy; return the wall time in seconds."""
    x = torch.from_numpy(split.x_train)
    y = torch.from_numpy(split.y_train)
    generator = torch.Generator().manual_seed(SEED)
    steps_per_epoch = -(-len(x) // config.batch_size)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs * steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(x), generator=generator)
        for batch in order.split(config.batch_size):
            optimizer.zero_grad()
            loss_fn(model(x[batch]), y[batch]).backward()
            optimizer.step()
            schedule.step()
    model.eval()
    return time.perf_counter() - start


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    write_atomic(path, buffer.getvalue())


def _export_settings(*, fold_batchnorm: bool) -> dict[str, object]:
    """Exporter arguments that decide whether BatchNormalization is folded."""
    return {
        "training": torch.onnx.TrainingMode.EVAL
        if fold_batchnorm
        else torch.onnx.TrainingMode.PRESERVE,
        "do_constant_folding": fold_batchnorm,
    }


def _exporter_description(*, fold_batchnorm: bool) -> str:
    settings = ", ".join(
        f"{key}={value}" for key, value in _export_settings(fold_batchnorm=fold_batchnorm).items()
    )
    return f"torch.onnx.export(dynamo=False) TorchScript exporter, opset {OPSET}, {settings}"


def export_onnx(
    model: nn.Module, example: torch.Tensor, *, fold_batchnorm: bool
) -> onnx.ModelProto:
    """Export `model` (in eval mode) with a dynamic batch dimension.

    The legacy TorchScript exporter is used because it needs nothing beyond torch;
    the dynamo exporter (the default since torch 2.9) needs onnxscript. Constant
    folding is turned off when BatchNormalization is preserved, as the exporter
    recommends for TrainingMode.PRESERVE. The IR version is capped for onnxruntime.
    """
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The legacy exporter is chosen deliberately; its deprecation notice is noise.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="The feature will be removed")
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}},
            **_export_settings(fold_batchnorm=fold_batchnorm),
        )
    proto = onnx.load_from_string(buffer.getvalue())
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def onnx_logits(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    """Run the saved model on `feed` with onnxruntime (single thread, CPU)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    return session.run([OUTPUT_NAME], feed)[0]


def _check_dynamic_batch(proto: onnx.ModelProto) -> None:
    for value in (*proto.graph.input, *proto.graph.output):
        if value.type.tensor_type.shape.dim[0].dim_param != BATCH_DIM:
            raise RuntimeError(f"{value.name}: batch dimension is not dynamic")


def _save_fixture(
    spec: Export,
    model: nn.Module,
    split: Split,
    train_seconds: float,
) -> dict[str, object]:
    """Export, save and verify one fixture; return its metadata."""
    example = torch.from_numpy(split.x_test[:2])
    proto = export_onnx(model, example, fold_batchnorm=spec.fold_batchnorm)
    _check_dynamic_batch(proto)
    onnx_path = MODELS_DIR / f"{spec.name}.onnx"
    write_atomic(onnx_path, proto.SerializeToString())
    onnx.checker.check_model(str(onnx_path), full_check=True)
    test_path = MODELS_DIR / f"{spec.name}_test.npz"
    calib_path = MODELS_DIR / f"{spec.name}_calib.npz"
    _write_npz(test_path, x=split.x_test, y=split.y_test)
    _write_npz(calib_path, **{INPUT_NAME: split.x_train[:CALIB_SIZE]})

    # Check against what was written: the test npz (accuracy, agreement with torch)
    # and the calibration feed (its key must be the graph input name).
    with np.load(test_path) as data:
        x_test, y_test = data["x"], data["y"]
    with np.load(calib_path) as data:
        onnx_logits(onnx_path, dict(data))
    with torch.no_grad():
        expected = model(torch.from_numpy(x_test)).numpy()
    logits = onnx_logits(onnx_path, {INPUT_NAME: x_test})
    max_abs_diff = float(np.abs(logits - expected).max())
    if not max_abs_diff < TOLERANCE:
        raise RuntimeError(f"{spec.name}: onnxruntime differs from torch by {max_abs_diff}")
    accuracy = float((logits.argmax(axis=1) == y_test).mean())

    metadata: dict[str, object] = {
        "name": spec.name,
        "dataset": "sklearn digits",
        "test_accuracy": round(accuracy, 6),
        "torch_version": torch.__version__,
        "exporter": _exporter_description(fold_batchnorm=spec.fold_batchnorm),
        "opset": OPSET,
        "ir_version": proto.ir_version,
        "input_shape": [BATCH_DIM, *split.x_test.shape[1:]],
        "train_seconds": round(train_seconds, 2),
        "max_abs_diff_vs_torch": max_abs_diff,
        "op_counts": dict(
            sorted(collections.Counter(node.op_type for node in proto.graph.node).items())
        ),
    }
    write_atomic(
        MODELS_DIR / f"{spec.name}.json",
        (json.dumps(metadata, indent=2) + "\n").encode(),
    )
    return metadata


def build(
    make_model: Callable[[], nn.Module],
    layout: tuple[int, ...],
    config: TrainConfig,
    exports: Sequence[Export],
) -> list[dict[str, object]]:
    """Train one model and write every requested fixture of it.

    The model is constructed after seeding so its initial weights are reproducible.
    Each fixture gets <name>.onnx, <name>.json, <name>_test.npz (held-out split, in
    the model's input layout) and <name>_calib.npz (training samples keyed by the
    graph input name, for data-aware compression).
    """
    seed_everything()
    split = load_split(layout)
    model = make_model()
    train_seconds = train(model, split, config)
    results = []
    for spec in exports:
        metadata = _save_fixture(spec, model, split, train_seconds)
        print(
            f"{spec.name}: onnx test accuracy {metadata['test_accuracy']:.4f}, "
            f"max |onnx - torch| {metadata['max_abs_diff_vs_torch']:.2e}, "
            f"trained in {train_seconds:.1f} s"
        )
        results.append(metadata)
    return results
