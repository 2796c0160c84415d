"""Gram matrices of weights summed a block at a time (read-only numerics).

A weight is read in the type the model stores it in (float32, float16, a memory map of
external data) and converted to float64 one block of columns or rows at a time, each
block added into the lower triangle of the Gram matrix by BLAS's ``syrk`` in place: no
copy of the whole weight, in float64 or otherwise, is ever made. The spectra of
``analyze``, the planner's projections and the certificates' operator norms all start
here; products with a weight in the planner's factors are made the same way
(:func:`times_blockwise`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy.linalg.blas import dsyrk as _syrk

__all__ = ["augmented_lower_gram", "frobenius_norm", "lower_gram", "times_blockwise"]

#: values of a block of a weight converted to float64 at a time
_BLOCK_VALUES = 1 << 22


def lower_gram(matrix: np.ndarray, minus: tuple[np.ndarray, np.ndarray] | None = None
               ) -> np.ndarray:
    """The float64 Gram matrix on the smaller side of ``matrix`` (``M M^T`` when it is
    wide, ``M^T M`` when tall), or of ``matrix - second @ first`` with ``minus`` =
    ``(second, first)``; **its lower triangle only** (what ``eigh`` reads). A low-rank
    residual of a large layer (822 MB for VGG's first FC layer) is never formed whole."""
    rows, cols = matrix.shape
    wide = rows <= cols
    side = rows if wide else cols

    def blocks() -> Iterator[np.ndarray]:
        for part in _parts(cols if wide else rows, side):
            block = np.asarray(matrix[:, part] if wide else matrix[part], dtype=float)
            if minus is not None:
                block = block - (minus[0] @ minus[1][:, part] if wide
                                 else minus[0][part] @ minus[1])
            yield block

    return _sum(side, blocks(), wide)


def augmented_lower_gram(weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """The lower triangle of the Gram matrix on the smaller side of the augmented
    ``W^ = [[W, b], [0, 1]]`` (a missing bias is a zero column): ``W^ W^T`` when ``W`` is
    wide, ``W^T W^`` when tall. ``W^`` is never formed: its blocks are."""
    rows, cols = weight.shape
    wide = rows <= cols
    side = (rows if wide else cols) + 1
    b = np.zeros(rows) if bias is None else np.asarray(bias, dtype=float).reshape(rows)

    def blocks() -> Iterator[np.ndarray]:
        for part in _parts(cols if wide else rows, side):
            if wide:  # columns [W[:, j]; 0]
                values = weight[:, part]
                block = np.zeros((side, values.shape[1]), order="F")
                block[:rows] = values
            else:  # rows [W[i], b_i]
                values = weight[part]
                block = np.empty((values.shape[0], side), order="F")
                block[:, :cols] = values
                block[:, cols] = b[part]
            yield block
        # the last column [b; 1] when wide, the last row [0, ..., 0, 1] when tall
        yield np.append(b, 1.0)[:, None] if wide else np.eye(1, side, side - 1)

    return _sum(side, blocks(), wide)


def frobenius_norm(matrix: np.ndarray) -> float:
    """``||matrix||_F`` in float64, a block of rows converted at a time. Each block is
    summed in row-major order whatever the layout of ``matrix`` (a stored weight can be a
    transposed memory map or its held float64 conversion), so the same values give the
    same norm to the last bit."""
    total = 0.0
    for part in _parts(matrix.shape[0], matrix.shape[1]):
        block = np.asarray(matrix[part], dtype=float, order="C")
        total += float(np.einsum("ij,ij->", block, block))
    return float(np.sqrt(total))


def times_blockwise(left: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``left @ weight`` in float64, ``weight`` converted a block of columns at a time
    when it is in another type (the whole of it is not converted at once)."""
    if weight.dtype == np.float64:
        return left @ weight
    out = np.empty((left.shape[0], weight.shape[1]))
    for part in _parts(weight.shape[1], weight.shape[0]):
        out[:, part] = left @ np.asarray(weight[:, part], dtype=float)
    return out


def _parts(length: int, other: int) -> Iterator[slice]:
    """Slices of ``length`` whose blocks hold about :data:`_BLOCK_VALUES` values."""
    step = max(1, _BLOCK_VALUES // max(other, 1))
    for start in range(0, length, step):
        yield slice(start, start + step)


def _sum(side: int, blocks: Iterator[np.ndarray], wide: bool) -> np.ndarray:
    """``sum B B^T`` (``wide``) or ``sum B^T B`` of ``blocks``, lower triangle, in place."""
    total = np.zeros((side, side), order="F")
    for block in blocks:
        total = _syrk(1.0, np.asfortranarray(block), beta=1.0, c=total,
                      trans=0 if wide else 1, lower=1, overwrite_c=1)
    return total
