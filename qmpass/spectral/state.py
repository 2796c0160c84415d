"""The spectral state of an operator.

For ``y = W x + b`` the augmented matrix is ``W^ = [[W, b], [0, 1]]``; its singular
values ``s`` (descending) give the state ``psi = s / ||s||_2`` and the energy
distribution ``p = psi**2`` (sums to 1). Only singular values are needed, never
singular vectors, so the fast path is the eigenvalues of the Gram matrix of the smaller
side of ``W^``, summed a block of ``W`` at a time without building ``W^`` or converting
``W`` whole (:mod:`qmpass.spectral.gram`).
Gram eigenvalues carry an absolute error of about ``eps * s_max**2``: exact enough for
``p`` (what every metric uses) though not for the relative size of tiny singular values;
``method="svd"`` is the accurate LAPACK path (``scipy.linalg.svdvals``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
import scipy.linalg

from qmpass.spectral.gram import augmented_lower_gram

__all__ = [
    "SV_METHODS",
    "SVMethod",
    "SpectralState",
    "augmented_matrix",
    "augmented_singular_values",
    "spectral_state",
]

#: how singular values are computed: Gram eigenvalues (fast) or LAPACK (accurate); not
#: to be confused with the planner's ``svd`` method (:data:`qmpass.plan.planner.Method`)
SVMethod = Literal["gram", "svd"]
SV_METHODS: tuple[SVMethod, ...] = ("gram", "svd")


def augmented_matrix(weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """``[[W, b], [0, 1]]``; a missing bias is a zero column."""
    rows, cols = weight.shape
    out = np.zeros((rows + 1, cols + 1))
    out[:rows, :cols] = weight
    if bias is not None:
        out[:rows, cols] = bias
    out[rows, cols] = 1.0
    return out


def augmented_singular_values(
    weight: np.ndarray, bias: np.ndarray | None, method: SVMethod = "gram"
) -> np.ndarray:
    """Singular values of the augmented matrix, descending (``min(d_out, d_in) + 1`` of them)."""
    if method == "svd":
        return scipy.linalg.svdvals(augmented_matrix(weight, bias), check_finite=False)
    gram = augmented_lower_gram(weight, bias)  # a block of the weight at a time
    eig = scipy.linalg.eigvalsh(gram, lower=True, check_finite=False, overwrite_a=True)
    return np.sqrt(np.clip(eig[::-1], 0.0, None))


@dataclass(frozen=True, eq=False)
class SpectralState:
    """Singular values of one operator's augmented matrix and what derives from them."""

    name: str
    singular_values: np.ndarray

    @cached_property
    def frobenius(self) -> float:
        """``||W^||_F``."""
        return float(np.sqrt(np.sum(self.singular_values**2)))

    @cached_property
    def psi(self) -> np.ndarray:
        """The state: singular values over their 2-norm."""
        return self.singular_values / self.frobenius

    @cached_property
    def energy(self) -> np.ndarray:
        """``p = psi**2``, a probability distribution over singular-value positions."""
        return self.psi**2

    @cached_property
    def energy_profile(self) -> np.ndarray:
        """Cumulative energy ``F(q) = sum_{j<=q} p_j`` (a CDF; the paper's profile of
        ``sigma`` instead of ``sigma**2`` is not one)."""
        return np.minimum(np.cumsum(self.energy), 1.0)

    @cached_property
    def effective_rank(self) -> float:
        """``exp(H(p))`` (Roy and Vetterli): 1 for rank one, ``n`` for a flat spectrum."""
        p = self.energy[self.energy > 0]
        return float(np.exp(-np.sum(p * np.log(p))))

    def energy_kept(self, rank: int) -> float:
        """Fraction of the energy in the top ``rank`` singular values."""
        if rank <= 0:
            return 0.0
        return float(self.energy_profile[min(rank, self.energy_profile.size) - 1])

    def rank_for_delta(self, delta: float) -> int:
        """Smallest ``q`` with ``S(rho_q || rho) = -log F(q) <= delta``.

        ``rho_q`` is the rank-``q`` truncation of ``rho`` renormalised; the relative entropy
        is ``-log(sum_{j<=q} p_j)``, so the bound keeps at least ``exp(-delta)`` of the energy.
        """
        if delta < 0:
            raise ValueError("delta must be non-negative")
        needed = np.exp(-delta)
        # a tolerance of a few ulps keeps delta = 0 at the full rank despite rounding
        q = int(np.searchsorted(self.energy_profile, needed - 1e-12)) + 1
        return min(q, self.singular_values.size)


def spectral_state(
    name: str, weight: np.ndarray, bias: np.ndarray | None, method: SVMethod = "gram"
) -> SpectralState:
    """The state of ``y = W x + b``."""
    values = augmented_singular_values(weight, bias, method)
    values.setflags(write=False)
    return SpectralState(name=name, singular_values=values)
