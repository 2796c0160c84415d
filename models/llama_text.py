"""Build models/llama_text.onnx: a small byte-level decoder-only LM, LLaMA architecture.

The architecture is LLaMA's, written by hand in torch (no transformers package): token
embedding, ``LAYERS`` pre-norm blocks of RMSNorm -> grouped-query causal self-attention
with rotary position embeddings (``HEADS`` query heads sharing ``KV_HEADS`` key/value
heads), RMSNorm -> SwiGLU MLP (``down(silu(gate(x)) * up(x))``), then a final RMSNorm and
an untied output projection. No Linear has a bias, as in LLaMA. The vocabulary is the 256
byte values, so no tokenizer (and no download) is needed.

Data: real text available offline, the Python sources of the CPython standard library of
the interpreter running this script (``sysconfig.get_paths()["stdlib"]``; ``test``
packages, ``site-packages`` and ``dist-packages`` left out). The files, sorted by
relative path, are split BY FILE with a seeded permutation into train / calibration /
test (``SPLIT``), so no window of the calibration or test text comes from a file the
model was trained on. Training samples random windows of the concatenated train files;
the calibration and test windows are non-overlapping windows at seeded random offsets of
their splits, stored as ``<name>_calib.npz`` (key ``input``: int64 ids, ``CALIB_WINDOWS x
CONTEXT``) and ``<name>_test.npz`` (``x``: int64 ids, ``y``: the next byte of every
position, both ``TEST_WINDOWS x CONTEXT``). The metadata records the interpreter version
and a digest of the text of every split; a different stdlib gives a different model, but
the committed windows keep the published measurements reproducible.

Exported by torch's TorchScript ONNX exporter (opset 17: RMSNorm is spelled out as
Pow/ReduceMean/Sqrt/Div/Mul, SiLU as Sigmoid/Mul), input ``input`` int64 ``(batch, CONTEXT)``
with a dynamic batch, output ``logits`` float32 ``(batch, CONTEXT, 256)``; checked against
torch on the test windows before anything is written. Projections on 3-D activations
export as MatMul nodes with the weight stored transposed (the operators qmpass
compresses); the embedding is a Gather (not a weight operator).

Run as ``python models/llama_text.py``: 1057 s for the committed files, on one thread of the
shared 2-core machine while another job ran (about 0.6 s a step alone); the train loss by
tenth of the run is in the metadata.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from _common import (
    INPUT_NAME,
    MODELS_DIR,
    OPSET,
    OUTPUT_NAME,
    SEED,
    _check_dynamic_batch,
    _write_npz,
    export_onnx,
    onnx_logits,
)
from torch import nn
from torch.nn import functional

from qmpass.modelio import write_atomic

sys.path.insert(0, str(MODELS_DIR.parent))  # the models package, for its metric
from models import perplexity

NAME = "llama_text"
VOCAB = 256
CONTEXT = 128
DIM = 128
LAYERS = 4
HEADS = 4
KV_HEADS = 2
HEAD_DIM = DIM // HEADS
HIDDEN = 352  # SwiGLU width, 2.75 x DIM (LLaMA's 8/3 x, rounded to a multiple of 32)
ROPE_BASE = 10000.0
NORM_EPS = 1e-5
#: fractions of the stdlib's files in train / calibration / test (by file)
SPLIT = (0.8, 0.1, 0.1)
CALIB_WINDOWS = 128
TEST_WINDOWS = 128
STEPS = 1000
BATCH = 16
LR = 3e-3
WARMUP = 50
WEIGHT_DECAY = 0.1
THREADS = 1
#: largest accepted |onnxruntime - torch| on any logit of the test windows
TOLERANCE = 1e-3


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` by its root mean square."""
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + NORM_EPS) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary position embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(DIM, HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, DIM, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """Attend over the positions of ``x`` (B, T, D); ``mask`` is additive (T, T)."""
        batch, tokens, _ = x.shape
        q = self.q_proj(x).view(batch, tokens, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k_proj(x).view(batch, tokens, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v_proj(x).view(batch, tokens, KV_HEADS, HEAD_DIM).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        repeat = HEADS // KV_HEADS  # each key/value head serves `repeat` query heads
        k = k[:, :, None].expand(batch, KV_HEADS, repeat, tokens, HEAD_DIM).reshape(
            batch, HEADS, tokens, HEAD_DIM)
        v = v[:, :, None].expand(batch, KV_HEADS, repeat, tokens, HEAD_DIM).reshape(
            batch, HEADS, tokens, HEAD_DIM)
        scores = q @ k.transpose(-2, -1) * HEAD_DIM**-0.5 + mask
        out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, DIM)
        return self.o_proj(out)


class SwiGLU(nn.Module):
    """LLaMA's gated MLP: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(DIM, HIDDEN, bias=False)
        self.up_proj = nn.Linear(DIM, HIDDEN, bias=False)
        self.down_proj = nn.Linear(HIDDEN, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the gated MLP to ``x`` (B, T, D)."""
        return self.down_proj(functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self) -> None:
        super().__init__()
        self.input_norm = RMSNorm(DIM)
        self.attn = Attention()
        self.post_norm = RMSNorm(DIM)
        self.mlp = SwiGLU()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """One decoder block with residual connections."""
        x = x + self.attn(self.input_norm(x), cos, sin, mask)
        return x + self.mlp(self.post_norm(x))


class ByteLlama(nn.Module):
    """Byte embedding, decoder blocks, final RMSNorm, untied output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = RMSNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        inverse = 1.0 / ROPE_BASE ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
        angles = torch.outer(torch.arange(CONTEXT).float(), inverse)
        angles = torch.cat((angles, angles), dim=-1)  # (CONTEXT, HEAD_DIM)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        causal = torch.full((CONTEXT, CONTEXT), -1e9).triu(1)  # 0 on and below the diagonal
        self.register_buffer("mask", causal, persistent=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
        for block in self.blocks:  # GPT-2's scaled init of the residual projections
            for proj in (block.attn.o_proj, block.mlp.down_proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * LAYERS))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Map byte ids (B, T) to next-byte logits (B, T, 256)."""
        tokens = ids.shape[1]
        cos, sin, mask = self.cos[:tokens], self.sin[:tokens], self.mask[:tokens, :tokens]
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        return self.lm_head(self.norm(x))


# -- data -------------------------------------------------------------------------------------
def stdlib_files() -> tuple[Path, list[Path]]:
    """The stdlib directory and its .py files (no test packages), sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    files = [f for f in root.rglob("*.py")
             if not skipped.intersection(f.relative_to(root).parts)]
    return root, sorted(files, key=lambda f: f.relative_to(root).as_posix())


def split_files(files: list[Path]) -> dict[str, list[Path]]:
    """Each split's files (a seeded permutation of ``files``, cut at ``SPLIT``)."""
    order = np.random.default_rng(SEED).permutation(len(files))
    bounds = np.cumsum([round(f * len(files)) for f in SPLIT[:-1]])
    parts = dict(zip(("train", "calib", "test"), np.split(order, bounds), strict=True))
    return {name: [files[i] for i in sorted(index)] for name, index in parts.items()}


def split_text(parts: dict[str, list[Path]]) -> dict[str, bytes]:
    """The concatenated bytes of each split's files, one newline between files."""
    return {name: b"\n".join(f.read_bytes() for f in chosen) for name, chosen in parts.items()}


def windows(text: bytes, count: int, seed: int) -> np.ndarray:
    """``count`` non-overlapping windows of ``CONTEXT + 1`` bytes at seeded offsets."""
    data = np.frombuffer(text, dtype=np.uint8)
    slots = len(data) // (CONTEXT + 1)
    if slots < count:
        raise RuntimeError(f"only {slots} windows of text, {count} wanted")
    picks = np.sort(np.random.default_rng(seed).choice(slots, count, replace=False))
    starts = picks * (CONTEXT + 1)
    return np.stack([data[s:s + CONTEXT + 1] for s in starts]).astype(np.int64)


def train(model: ByteLlama, text: bytes) -> tuple[float, list[float]]:
    """AdamW, linear warm-up then cosine decay, on random windows of ``text``; returns the
    wall time and the mean training loss of each tenth of the run."""
    data = torch.from_numpy(np.frombuffer(text, dtype=np.uint8).astype(np.int64))
    generator = torch.Generator().manual_seed(SEED)
    decay = [p for p in model.parameters() if p.ndim == 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay,
                                                           "weight_decay": 0.0}],
        lr=LR, betas=(0.9, 0.95))

    def rate(step: int) -> float:
        if step < WARMUP:
            return (step + 1) / WARMUP
        return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    losses: list[float] = []
    tenths: list[float] = []
    start = time.perf_counter()
    model.train()
    for step in range(STEPS):
        offsets = torch.randint(len(data) - CONTEXT - 1, (BATCH,), generator=generator)
        batch = torch.stack([data[o:o + CONTEXT + 1] for o in offsets.tolist()])
        logits = model(batch[:, :-1])
        loss = functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if (step + 1) % (STEPS // 10) == 0:
            tenths.append(round(float(np.mean(losses[-(STEPS // 10):])), 4))
            print(f"step {step + 1}/{STEPS}: train loss {tenths[-1]:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    return time.perf_counter() - start, tenths


def main() -> None:
    """Train, export, check against torch and write the fixture's files."""
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(THREADS)
    _, files = stdlib_files()
    parts = split_files(files)
    text = split_text(parts)
    calib = windows(text["calib"], CALIB_WINDOWS, SEED + 1)
    test = windows(text["test"], TEST_WINDOWS, SEED + 2)
    model = ByteLlama()
    seconds, tenths = train(model, text["train"])

    proto = export_onnx(model, torch.from_numpy(test[:2, :-1]), fold_batchnorm=True)
    _check_dynamic_batch(proto)
    onnx_path = MODELS_DIR / f"{NAME}.onnx"
    write_atomic(onnx_path, proto.SerializeToString())
    onnx.checker.check_model(str(onnx_path), full_check=True)
    x_test, y_test = test[:, :-1], test[:, 1:]
    logits = onnx_logits(onnx_path, {INPUT_NAME: x_test})
    with torch.no_grad():
        max_abs_diff = float(np.abs(logits - model(torch.from_numpy(x_test)).numpy()).max())
    if not max_abs_diff < TOLERANCE:
        raise RuntimeError(f"{NAME}: onnxruntime differs from torch by {max_abs_diff}")
    onnx_logits(onnx_path, {INPUT_NAME: calib[:, :-1]})  # the calibration feed runs
    _write_npz(MODELS_DIR / f"{NAME}_test.npz", x=x_test, y=y_test)
    _write_npz(MODELS_DIR / f"{NAME}_calib.npz", **{INPUT_NAME: calib[:, :-1]})
    test_ppl = perplexity(logits, y_test)

    metadata: dict[str, object] = {
        "name": NAME,
        "dataset": f"CPython {sys.version.split()[0]} standard library .py sources "
                   "(no test packages), split by file",
        "split_files": {k: len(v) for k, v in parts.items()},
        "split_bytes": {k: len(v) for k, v in text.items()},
        "split_sha256": {k: hashlib.sha256(v).hexdigest() for k, v in text.items()},
        "architecture": {"vocab": VOCAB, "context": CONTEXT, "dim": DIM, "layers": LAYERS,
                         "heads": HEADS, "kv_heads": KV_HEADS, "hidden": HIDDEN,
                         "rope_base": ROPE_BASE, "norm_eps": NORM_EPS},
        "parameters": sum(p.numel() for p in model.parameters()),
        "training": {"steps": STEPS, "batch": BATCH, "lr": LR, "warmup": WARMUP,
                     "weight_decay": WEIGHT_DECAY, "threads": THREADS,
                     "train_loss_by_tenth": tenths},
        "calib_windows": CALIB_WINDOWS,
        "test_windows": TEST_WINDOWS,
        "test_perplexity": round(test_ppl, 4),
        "torch_version": torch.__version__,
        "exporter": f"torch.onnx.export(dynamo=False) TorchScript exporter, opset {OPSET}, "
                    "do_constant_folding=True",
        "opset": OPSET,
        "ir_version": proto.ir_version,
        "input_shape": ["batch", CONTEXT],
        "output": OUTPUT_NAME,
        "train_seconds": round(seconds, 1),
        "max_abs_diff_vs_torch": max_abs_diff,
        "op_counts": dict(
            sorted(collections.Counter(node.op_type for node in proto.graph.node).items())
        ),
    }
    write_atomic(MODELS_DIR / f"{NAME}.json", (json.dumps(metadata, indent=2) + "\n").encode())
    print(f"{NAME}: held-out perplexity {test_ppl:.3f} (uniform: {VOCAB}), "
          f"max |onnx - torch| {max_abs_diff:.2e}, trained in {seconds:.0f} s")


if __name__ == "__main__":
    main()
