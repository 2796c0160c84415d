"""Build models/transformer_digits.onnx: a small pre-norm transformer encoder.

Each 8x8 digit is a sequence of 8 tokens (its rows) of 8 features. Attention is
written by hand with separate q_proj, k_proj and v_proj Linears (rather than
nn.MultiheadAttention, whose fused in_proj hides them) so the exported graph has
three MatMul nodes reading the same LayerNormalization output: the pattern
qmpass fuses into one shared-basis matmul. Linears on 3-D activations export as
MatMul (weight stored transposed, d_in x d_out) + Add; the classifier on the pooled
2-D features exports as Gemm. Run as `python models/transformer_digits.py`.
"""

from __future__ import annotations

import torch
from _common import Export, TrainConfig, build
from torch import nn

NAME = "transformer_digits"
LAYOUT = (8, 8)
CONFIG = TrainConfig(epochs=80, lr=2e-3, weight_decay=1e-2)
TOKENS, FEATURES = LAYOUT
DIM = 64
HEADS = 4
HIDDEN = 128
LAYERS = 2
CLASSES = 10


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate, unfused Q/K/V projections."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, heads, T, head_dim)."""
        batch, tokens, _ = x.shape
        return x.reshape(batch, tokens, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled dot-product attention over the tokens of `x` (B, T, D)."""
        batch, tokens, dim = x.shape
        q = self._split_heads(self.q_proj(x))
        k = self._split_heads(self.k_proj(x))
        v = self._split_heads(self.v_proj(x))
        weights = (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.out_proj(out)


class EncoderLayer(nn.Module):
    """Pre-norm encoder layer: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the attention and MLP sub-blocks with residual connections."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DigitTransformer(nn.Module):
    """Token embedding + learned positions, encoder layers, mean-pool, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, DIM)
        self.pos = nn.Parameter(torch.randn(1, TOKENS, DIM) * 0.02)
        self.layers = nn.Sequential(*(EncoderLayer(DIM, HEADS, HIDDEN) for _ in range(LAYERS)))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map digits (B, 8, 8) to logits (B, 10)."""
        h = self.layers(self.embed(x) + self.pos)
        return self.head(self.norm(h).mean(dim=1))


def main() -> None:
    """Train, export and verify the fixture."""
    build(DigitTransformer, LAYOUT, CONFIG, [Export(NAME)])


if __name__ == "__main__":
    main()
