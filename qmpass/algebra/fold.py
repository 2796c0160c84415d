"""Folds between an IR's stored weights and the matrix view ``y = W x + b``.

* :func:`fold_batchnorm`: an inference ``BatchNormalization`` after a convolution acts per
  output channel, ``y = gamma (z - mean) / sqrt(var + eps) + beta`` with ``z = W x + b``,
  so it folds into the convolution: ``scale = gamma / sqrt(var + eps)``,
  ``W' = scale W`` (row-wise), ``b' = scale (b - mean) + beta``. Both extractions (ONNX
  and Relax) fold with it, so they give the same numbers.
* :func:`conv_kernel`: the matrix view of a (grouped) convolution is block-diagonal over
  the groups, each block ``Cout/g x (Cin/g * prod(kernel))`` with rows in (input channel,
  kernel positions) order; the kernel ``(Cout, Cin/g, *kernel)`` is its blocks stacked
  and reshaped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["conv_kernel", "fold_batchnorm"]


def fold_batchnorm(
    w: np.ndarray,
    b: np.ndarray | None,
    gamma: np.ndarray,
    beta: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
) -> tuple[np.ndarray, np.ndarray]:
    """``(scale W, scale (b - mean) + beta)`` with ``scale = gamma / sqrt(var + eps)``
    applied along ``w``'s first (output-channel) axis; ``b`` None is a zero bias.

    The caller checks ``var + eps > 0`` (where it is not, the model computes NaN); the
    arrays keep their dtype (no cast), so each extraction keeps its precision."""
    scale = gamma / np.sqrt(var + eps)
    folded = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    bias = scale * ((b if b is not None else 0.0) - mean) + beta
    return folded, bias


def conv_kernel(matrix: np.ndarray, kernel_shape: Sequence[int], groups: int = 1) -> np.ndarray:
    """The ``(Cout, Cin/groups, *kernel_shape)`` kernel of a convolution's matrix view
    ``matrix`` (``Cout x Cin*prod(kernel)``, block-diagonal over ``groups``)."""
    d_out, d_in = matrix.shape
    rows, cols = d_out // groups, d_in // groups
    blocks = [matrix[g * rows:(g + 1) * rows, g * cols:(g + 1) * cols] for g in range(groups)]
    stacked = np.concatenate(blocks)  # a copy: the view stays read-only
    taps = int(np.prod(kernel_shape)) if len(kernel_shape) else 1
    return stacked.reshape(d_out, cols // taps, *kernel_shape)
