"""Distances between operators, and the bounds qmpass relies on (docs/DESIGN.md, "The math").

What holds, and is used:

* ``fs_distance``: the Fubini-Study distance of two spectra, ``arccos(sum sqrt(p1 p2))``
  (the Bhattacharyya angle of the energy distributions), in ``[0, pi/2]``.
* ``bures_angle``: ``arccos sqrt F(rho1, rho2)`` between the input-side density matrices
  ``rho = W^T W^ / ||W^||_F**2``. ``fs_distance <= bures_angle`` always, and the Bures
  angle is 0 exactly when ``W^_1 = c Q W^_2`` for an orthogonal ``Q``: so spectra are a
  sound filter that rules pairs *out*, never in.
* Mirsky and Weyl make spectral distance a lower bound on weight distance.
* ``operator_norm``: ``||M||_op``, never below the true value. Every step of a plan
  carries a certificate built from it (:mod:`qmpass.plan.units`): the change of one
  output vector is at most ``R ||W - W'||_op + ||b - b'||`` for inputs no longer than
  ``R`` (``tests/test_certificates.py`` checks it on the rewritten models).
* ``quantum_relative_entropy``: the reference for the closed form
  ``S(rho_q || rho) = -log F(q)`` that ``SpectralState.rank_for_delta`` uses.

What does not hold (kept as tests in ``tests/test_paper_claims.py``, with the paper's
formulas in :mod:`qmpass.spectral.paper`): equal spectra do not imply equal functions
(``W`` and ``Q W``), ``W2 <= sqrt(2) d_FS`` fails, the paper's "majorization profile" of
``sigma`` is not a CDF, and its Lindblad equation (7) is not trace preserving.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import scipy.linalg

from qmpass.spectral.gram import lower_gram
from qmpass.spectral.state import SpectralState

__all__ = [
    "bures_angle",
    "bures_angle_of_factors",
    "fs_distance",
    "fs_distance_matrix",
    "input_factor",
    "operator_norm",
    "psi_matrix",
    "quantum_relative_entropy",
    "weighted_fs",
]


def fs_distance(p1: np.ndarray, p2: np.ndarray) -> float:
    """Fubini-Study distance of two energy distributions (shorter one zero-padded)."""
    n = min(p1.size, p2.size)  # the padded tail contributes sqrt(p * 0) = 0
    overlap = float(np.sum(np.sqrt(p1[:n] * p2[:n])))
    return float(np.arccos(np.clip(overlap, 0.0, 1.0)))


def psi_matrix(states: Sequence[SpectralState]) -> np.ndarray:
    """The ``psi`` vectors as rows, zero-padded to the longest: ``psi_matrix @ psi_matrix.T``
    holds every FS overlap ``sum sqrt(p1 p2)``."""
    length = max((s.psi.size for s in states), default=0)
    psi = np.zeros((len(states), length))
    for i, state in enumerate(states):
        psi[i, : state.psi.size] = state.psi
    return psi


def fs_distance_matrix(states: Sequence[SpectralState]) -> np.ndarray:
    """All pairwise FS distances, as one matrix product of the zero-padded ``psi`` vectors."""
    psi = psi_matrix(states)
    return np.arccos(np.clip(psi @ psi.T, 0.0, 1.0))


def input_factor(augmented: np.ndarray) -> np.ndarray:
    """A factor ``F`` with ``F^T F = A^T A`` and ``min(rows, cols)`` rows (R of a QR).

    The Bures angle depends on ``A`` only through ``A^T A``, so a tall matrix can be
    replaced by this square factor once and reused for every pair it is part of.
    """
    rows, cols = augmented.shape
    if rows <= cols:
        return augmented
    return scipy.linalg.qr(augmented, mode="r", check_finite=False)[0][:cols]


def bures_angle(a: np.ndarray, b: np.ndarray) -> float:
    """Bures angle between ``rho_a = A^T A / ||A||_F**2`` and ``rho_b`` (same column count).

    With ``rho = A^T A`` the root fidelity is ``||sqrt(rho_a) sqrt(rho_b)||_* =
    ||A B^T||_*`` (polar decomposition), so no matrix square root is formed; tall
    matrices are first reduced to their square ``R`` factor, which has the same Gram matrix.
    """
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"Bures angle needs equal input widths, got {a.shape[1]} and {b.shape[1]}")
    return bures_angle_of_factors(input_factor(a), input_factor(b))


def bures_angle_of_factors(fa: np.ndarray, fb: np.ndarray) -> float:
    """:func:`bures_angle` of two matrices given by their :func:`input_factor`."""
    nuclear = float(np.sum(scipy.linalg.svdvals(fa @ fb.T, check_finite=False)))
    root_fidelity = nuclear / (np.linalg.norm(fa) * np.linalg.norm(fb))
    return float(np.arccos(np.clip(root_fidelity, 0.0, 1.0)))


def quantum_relative_entropy(rho: np.ndarray, sigma: np.ndarray) -> float:
    """``S(rho || sigma) = tr rho (log rho - log sigma)`` by eigendecomposition (0 log 0 = 0).

    Infinite when the support of ``rho`` is not inside that of ``sigma``.
    """
    tol = 1e-12
    r_val, r_vec = scipy.linalg.eigh(rho)
    s_val, s_vec = scipy.linalg.eigh(sigma)
    r_pos = r_val > tol
    entropy = float(np.sum(r_val[r_pos] * np.log(r_val[r_pos])))
    # tr(rho log sigma) = sum_jk r_j |<r_j|s_k>|^2 log s_k
    overlap = (r_vec[:, r_pos].T @ s_vec) ** 2
    s_pos = s_val > tol
    if np.any(overlap[:, ~s_pos] > tol):
        return float("inf")
    cross = float(r_val[r_pos] @ overlap[:, s_pos] @ np.log(s_val[s_pos]))
    return entropy - cross


def weighted_fs(
    blocks1: Sequence[tuple[str, SpectralState]],
    blocks2: Sequence[tuple[str, SpectralState]],
    weights: Mapping[str, float],
    default_weight: float = 1.0,
) -> float:
    """Weighted FS distance of two composite blocks (paper eq. 9).

    ``sqrt(sum_m c_m d_FS(block1_m, block2_m)**2)``, the blocks paired in order; ``c_m``
    is the weight of the pair's op type (a per-target parameter, e.g. Conv 1.2 on Ascend).
    """
    if len(blocks1) != len(blocks2):
        raise ValueError("composite blocks must have the same number of members")
    total = 0.0
    for (type1, s1), (type2, s2) in zip(blocks1, blocks2, strict=True):
        if type1 != type2:
            raise ValueError(f"members pair a {type1} with a {type2}")
        total += weights.get(type1, default_weight) * fs_distance(s1.energy, s2.energy) ** 2
    return float(np.sqrt(total))


def operator_norm(matrix: np.ndarray,
                  minus: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """``||matrix||_op``, or ``||matrix - second @ first||_op`` with ``minus`` =
    ``(second, first)``, never below the true value (certificates rely on it): the top
    eigenvalue of the Gram matrix on the smaller side (:func:`lower_gram`; only that one is
    computed), raised by a bound on its rounding error (Weyl: ``n eps ||G||_inf``)."""
    if not matrix.size:
        return 0.0
    lower = lower_gram(matrix, minus)
    side = lower.shape[0]
    rounding = side * np.finfo(float).eps * _symmetric_inf_norm(lower)
    top = float(scipy.linalg.eigvalsh(lower, overwrite_a=True,
                                      subset_by_index=[side - 1, side - 1])[0])
    return float(np.sqrt(max(top, 0.0) + rounding))


def _symmetric_inf_norm(lower: np.ndarray) -> float:
    """``||G||_inf`` of the symmetric ``G`` whose lower triangle ``lower`` holds, a few
    rows at a time."""
    side = lower.shape[0]
    sums = np.zeros(side)
    for start in range(0, side, 256):
        part = np.abs(np.tril(lower[start:start + 256], k=start))
        sums[start:start + part.shape[0]] += part.sum(axis=1)
        sums += part.sum(axis=0)
        sums[start:start + part.shape[0]] -= np.diagonal(part, offset=start)
    return float(sums.max())

