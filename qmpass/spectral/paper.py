"""The source paper's formulas that qmpass does not use, kept to test its claims.

``tests/test_paper_claims.py`` holds the counterexamples: its eq. (3),
``W2(F1, F2) <= sqrt(2) d_FS``, fails (``wasserstein2``), and its Lindblad equation (7)
as printed (``paper_eq7_derivative``) is not trace preserving, unlike the GKSL generator
(``gksl_derivative``). Nothing in qmpass's analysis, planning or rewriting imports this
module.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["gksl_derivative", "paper_eq7_derivative", "wasserstein2"]


def wasserstein2(p1: np.ndarray, p2: np.ndarray) -> float:
    """2-Wasserstein distance of two energy distributions on positions ``0, 1, 2, ...``.

    In one dimension ``W2**2 = int_0^1 |Q1(u) - Q2(u)|**2 du`` with the quantile functions
    ``Q``; both are step functions, so the integral is exact over the merged breakpoints
    of the two CDFs. (scipy's ``wasserstein_distance`` is the 1-Wasserstein distance.)
    """
    c1, c2 = np.cumsum(p1) / np.sum(p1), np.cumsum(p2) / np.sum(p2)
    levels = np.unique(np.concatenate(([0.0], c1, c2)))
    levels = levels[levels <= 1.0]
    mids = (levels[:-1] + levels[1:]) / 2
    q1 = np.minimum(np.searchsorted(c1, mids), p1.size - 1)
    q2 = np.minimum(np.searchsorted(c2, mids), p2.size - 1)
    return float(np.sqrt(np.sum(np.diff(levels) * (q1 - q2) ** 2)))


def gksl_derivative(
    rho: np.ndarray, hamiltonian: np.ndarray, jump_operators: Sequence[np.ndarray]
) -> np.ndarray:
    """``d rho/dt = -i[H, rho] + sum_k (L_k rho L_k^+ - 1/2 {L_k^+ L_k, rho})``: the GKSL
    (Lindblad) generator, which preserves trace and Hermiticity."""
    out = -1j * (hamiltonian @ rho - rho @ hamiltonian)
    for jump in jump_operators:
        jd = jump.conj().T
        out += jump @ rho @ jd - 0.5 * (jd @ jump @ rho + rho @ jd @ jump)
    return out


def paper_eq7_derivative(
    rho: np.ndarray, hamiltonian: np.ndarray, jump_operators: Sequence[np.ndarray]
) -> np.ndarray:
    """The paper's eq. (7) as printed, ``i d rho/dt = -i[H, rho] + sum_k L_k rho L_k^+``,
    solved for ``d rho/dt``: without the anticommutator it does not preserve the trace."""
    rhs = -1j * (hamiltonian @ rho - rho @ hamiltonian)
    for jump in jump_operators:
        rhs += jump @ rho @ jump.conj().T
    return -1j * rhs
