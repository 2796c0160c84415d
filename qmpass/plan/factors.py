"""The new weights a planned step needs, derived from the model and calibration data.

Low-rank and shared-basis steps use one construction. Stack the members' matrices
``W = [W_1; ...; W_n]`` (one operator is the case ``n = 1``), weight member ``i`` by
``1/||W_i S||_F`` (``D``) so each counts by its *relative* error, and take the left
singular vectors ``U_q`` of ``D W S``, where ``S = C^(1/2)`` is the square root of the
input covariance (the identity when the pass is data-free). Then

    W' = D^-1 U_q U_q^T D W,   first = U_q^T D W  (q x d_in),  second = D^-1 U_q.

With ``S = I`` and ``n = 1`` this is the truncated SVD (``first = S_q V_q^T``,
``second = U_q``). With data it is the whitened truncation ``[W C^(1/2)]_q C^(-1/2)``
of docs/DESIGN.md, written as an output-side projection so no inverse of ``C`` is needed
(when ``C`` is singular it reaches the same minimum of ``E||(W - W')(x - mu)||^2``). The
bias absorbs the mean of what was cut: ``b' = b + (W - W') mu``. The relative error
after keeping ``q`` directions is the tail energy of the singular values.

For a cluster this is docs/DESIGN.md's shared basis: the right singular vectors of ``D W S``
are the eigenvectors of the cluster's mixed state ``rho_C = (1/n) sum_i rho_i`` with
``rho_i = S W_i^T W_i S / ||W_i S||_F^2``, so the rows of ``first`` span its top-``q``
eigenspace ``P_q``, and member ``i`` loses ``1 - tr(P_q rho_i)`` of its energy
(:meth:`Projection.member_errors`).

ASVD (activation-aware SVD, Yuan et al. 2023) scales the input side of ``W`` by
``S = diag(s)^alpha`` with ``s`` each input channel's activation magnitude, truncates
``W S`` and unscales: ``W' = [W S]_q S^-1``. That is the construction above with the
diagonal ``S^2`` in place of ``C`` (:class:`ActivationScaled`); ``s`` is the channel's
root mean square ``sqrt(E[x_j^2])`` (the calibration statistics hold the second moment,
not ``E|x_j|``, ASVD's own choice) and ``alpha = 0.5``. As published, ASVD leaves the
bias as it is (the mean it sees is zero).

Channel pruning keeps channels ``S`` of an activation and, for each consumer, replaces
the removed channels ``R`` by their least-squares estimate from the kept ones:
``x_R ~ mu_R + C_RS C_SS^-1 (x_S - mu_S)``; the consumer folds this map (``mix``) and its
constant part (``shift``) into its weights and bias.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import scipy.linalg

from qmpass.spectral import lower_gram, times_blockwise
from qmpass.spill import Spilled
from qmpass.verify.stats import LowRankCov

if TYPE_CHECKING:  # the units import this module
    from qmpass.plan.units.common import StatsLike

__all__ = [
    "ASVD_ALPHA",
    "ActivationScaled",
    "HeldProjection",
    "Projection",
    "compensation",
    "greedy_channel_order",
    "projection",
    "sqrt_psd",
    "stacked_weight",
]


#: ASVD's exponent of the activation scale (the paper's default)
ASVD_ALPHA = 0.5


@dataclass(frozen=True, eq=False)
class ActivationScaled:
    """ASVD's view of one operator's calibration statistics, read by the planner like
    them: ``cov`` is ``S^2 = diag(sqrt(E[x_j^2]))^(2 alpha)``, ``mean`` is zero (the bias
    is not refitted), ``max_norm`` that of the inputs (for the certificate)."""

    stats: StatsLike
    alpha: float = ASVD_ALPHA

    @cached_property
    def cov(self) -> np.ndarray:
        rms = np.sqrt(np.clip(_variances(self.stats) + self.stats.mean**2, 0.0, None))
        return np.diag(rms ** (2 * self.alpha))

    @property
    def mean(self) -> np.ndarray:
        return np.zeros_like(self.stats.mean)

    @property
    def max_norm(self) -> float:
        return self.stats.max_norm


def _variances(stats: StatsLike) -> np.ndarray:
    """The diagonal of ``stats.cov``, without making a low-rank one whole."""
    variances = getattr(stats, "variances", None)
    return variances() if variances is not None else np.diag(stats.cov)


def covariance(stats: StatsLike | None) -> np.ndarray | LowRankCov | None:
    """What :func:`projection` takes of ``stats``: its covariance as held (a
    :class:`~qmpass.verify.stats.LowRankCov` is not made whole)."""
    if stats is None:
        return None
    held = getattr(stats, "held_cov", None)
    return held if held is not None else stats.cov


def sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance (negative rounding noise clipped to 0)."""
    values, vectors = scipy.linalg.eigh(matrix, driver="evd")  # divide and conquer: ~2x evr
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


#: bytes of covariances and their square roots kept: the fused and the separate variants
#: of a cluster's members read one covariance, and its root is an eigendecomposition
ROOT_BYTES = 256 << 20
#: id -> (the covariance, held so that its id stays its own and a spilled one stays
#: loaded, and its root)
_ROOTS: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
_ROOTS_LOCK = threading.Lock()


def _root(cov: np.ndarray) -> np.ndarray:
    """:func:`sqrt_psd` of ``cov``, kept for the next projection of the same array."""
    with _ROOTS_LOCK:
        found = _ROOTS.get(id(cov))
        if found is not None and found[0] is cov:
            _ROOTS.move_to_end(id(cov))
            return found[1]
    root = sqrt_psd(cov)
    with _ROOTS_LOCK:
        _ROOTS[id(cov)] = (cov, root)
        while len(_ROOTS) > 1 and sum(
                c.nbytes + r.nbytes for c, r in _ROOTS.values()) > ROOT_BYTES:
            _ROOTS.popitem(last=False)
    return root


@dataclass(frozen=True)
class Projection:
    """The decomposition behind every rank of a (stacked) low-rank step.

    ``energy[j]`` is the squared j-th singular value of ``D W S``; ``tail(q)`` is the
    summed relative error of the members when ``q`` directions are kept.
    """

    weight: np.ndarray  # stacked W, sum(d_out) x d_in
    scale: np.ndarray  # D as a vector over the stacked rows
    basis: np.ndarray  # U, sum(d_out) x r
    energy: np.ndarray  # r squared singular values, descending
    member_rows: tuple[int, ...]

    @property
    def rank(self) -> int:
        """How many directions the decomposition resolves (its numerical rank)."""
        return int(self.energy.size)

    def tail(self, rank: int) -> float:
        return float(self.energy[rank:].sum())

    @cached_property
    def _member_tails(self) -> np.ndarray:
        """``[i, q]``: energy of member ``i`` outside the first ``q`` directions."""
        bounds = np.cumsum((0, *self.member_rows))
        per_direction = np.array(
            [np.sum(self.basis[lo:hi] ** 2, axis=0) for lo, hi in itertools.pairwise(bounds)]
        ) * self.energy  # members x directions
        tails = np.cumsum(per_direction[:, ::-1], axis=1)[:, ::-1]
        return np.hstack([tails, np.zeros((len(self.member_rows), 1))])

    def member_errors(self, rank: int) -> np.ndarray:
        """Relative error of each member at ``rank`` (energy outside the kept space)."""
        return self._member_tails[:, min(rank, self.rank)]

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """``first`` (rank x d_in) and ``second`` (sum d_out x rank). Past the numerical
        rank the extra directions are zero (the product is already exact there), so an
        aligned rank can be asked for."""
        u = self.basis[:, :rank]
        first = times_blockwise((self.scale[:, None] * u).T, self.weight)  # no scaled copy of W
        second = u / self.scale[:, None]
        missing = rank - u.shape[1]
        if missing > 0:
            first = np.vstack([first, np.zeros((missing, first.shape[1]))])
            second = np.hstack([second, np.zeros((second.shape[0], missing))])
        return first, second


def stacked_weight(weights: Sequence[np.ndarray]) -> np.ndarray:
    """The members' weights stacked (one member: its read-only weight itself, not a copy:
    822 MB for VGG's first FC layer). They may be in their stored type
    (:attr:`~qmpass.extract.Operator.stored_weight`): every product with them here
    converts a block at a time (:func:`~qmpass.spectral.times_blockwise`,
    :func:`~qmpass.spectral.lower_gram`) or promotes to float64."""
    return np.asarray(weights[0]) if len(weights) == 1 else np.vstack(weights)


def projection(weights: Sequence[np.ndarray], cov: np.ndarray | LowRankCov | None
               ) -> Projection:
    """The :class:`Projection` of members ``weights`` (each d_out_i x d_in) under the input
    covariance ``cov`` (None: data-free, ``S = I``).

    Only the output side of ``D W S`` is needed. Where the stack has no more rows than
    columns, its Gram matrix ``D W C W^T D`` gives it without a square root of ``C`` (an
    eigendecomposition of ``d_in x d_in`` saved: 9216 x 9216 on AlexNet's first FC layer)
    and without a scaled copy of ``W``; a covariance held as a factor
    (:class:`~qmpass.verify.stats.LowRankCov`, ``C = F^T F + r I``) gives it as
    ``(W F^T)(W F^T)^T + r W W^T``, never forming ``C``.
    """
    stacked = stacked_weight(weights)
    rows, cols = stacked.shape
    bounds = np.cumsum((0, *(w.shape[0] for w in weights)))
    if rows <= cols:  # (data-free too: no scaled copy of W, 822 MB on VGG's first FC)
        # data-free, a block of W at a time: W in its stored type is never converted whole
        if cov is None:
            gram = lower_gram(stacked)
        elif isinstance(cov, LowRankCov):
            seen = times_blockwise(cov.factor, stacked.T).T  # W F^T, rows x n
            gram = seen @ seen.T
            if cov.ridge:
                ridge = lower_gram(stacked)
                ridge += np.tril(ridge, -1).T
                gram += cov.ridge * ridge
        else:
            gram = stacked @ cov @ stacked.T
        row_energy = np.diag(gram).copy()  # ||(W S)_r||^2 of each stacked row r
        scale = _member_scale(row_energy, bounds)
        gram *= scale[:, None]  # in place: each temporary is 134 MB on AlexNet's first FC
        gram *= scale[None, :]
        basis, energy = _left_singular_gram(gram, rows, cols)
    else:  # (d_in below the rows: a covariance held as a factor is made whole)
        dense = cov.load() if isinstance(cov, LowRankCov) else cov
        seen = np.asarray(stacked, dtype=float) if dense is None else stacked @ _root(dense)
        scale = _member_scale(np.einsum("ij,ij->i", seen, seen), bounds)
        basis, energy = _left_singular(scale[:, None] * seen)
    return Projection(
        weight=stacked,
        scale=scale,
        basis=basis,
        energy=energy,
        member_rows=tuple(w.shape[0] for w in weights),
    )


class HeldProjection:
    """A :class:`Projection` kept in memory while the projections held stay within
    ``HELD_BYTES`` (least recently used first out), and otherwise on disk: a plan holds a
    unit per operator, and holding every operator's weight and basis is holding the model
    twice over. A projection pushed out keeps its basis in a temporary file
    (:class:`~qmpass.spill.Spilled`) and gets its weight from ``weight`` (the members'
    weights stacked again: read from the model's files, no decomposition), so asking for
    it again reads it back, the same arrays; ``compute`` makes it from scratch where it
    has no file (a Dask worker's copy)."""

    def __init__(self, proj: Projection, compute: Callable[[], Projection],
                 weight: Callable[[], np.ndarray] | None = None) -> None:
        self._compute = compute
        self._weight = weight
        self._parked: tuple[Spilled, np.ndarray, np.ndarray, tuple[int, ...]] | None = None
        self._key = object()
        _hold(self._key, proj, self)

    def get(self) -> Projection:
        with _HELD_LOCK:
            found = _HELD.get(self._key)
            if found is not None:
                _HELD.move_to_end(self._key)
                return found[0]
        if self._parked is not None and self._weight is not None:
            basis, scale, energy, rows = self._parked
            proj = Projection(self._weight(), scale, basis.load(), energy, rows)
        else:
            proj = self._compute()
        _hold(self._key, proj, self)
        return proj

    def _park(self, proj: Projection) -> None:
        """Keep ``proj``'s basis on disk (it is leaving memory)."""
        if self._parked is None and self._weight is not None:
            self._parked = (Spilled(proj.basis), proj.scale, proj.energy, proj.member_rows)

    def __getstate__(self) -> dict[str, object]:  # pickled: the key is this process's
        return {"_compute": self._compute, "_weight": None, "_parked": None}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._key = object()


#: bytes of weights and bases of the projections held in memory (:class:`HeldProjection`;
#: the others wait on disk)
HELD_BYTES = 128 << 20
#: key -> (projection, the HeldProjection it is held for)
_HELD: OrderedDict[object, tuple[Projection, HeldProjection]] = OrderedDict()
_HELD_LOCK = threading.Lock()


def _hold(key: object, proj: Projection, owner: HeldProjection) -> None:
    leaving = []
    with _HELD_LOCK:
        _HELD[key] = (proj, owner)
        _HELD.move_to_end(key)
        while _HELD and sum(  # one over the budget alone waits on disk too
                p.weight.nbytes + p.basis.nbytes for p, _ in _HELD.values()) > HELD_BYTES:
            leaving.append(_HELD.popitem(last=False)[1])
    for gone, holder in leaving:
        holder._park(gone)


def release() -> None:
    """Empty the caches of this module (projections held in memory go to disk first):
    what planning kept for speed, given back before the model runs in onnxruntime."""
    with _HELD_LOCK:
        leaving = list(_HELD.values())
        _HELD.clear()
    for proj, holder in leaving:
        holder._park(proj)
    with _ROOTS_LOCK:
        _ROOTS.clear()


def _member_scale(row_energy: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """``D`` over the stacked rows: ``1 / ||W_i S||_F`` for the rows of member ``i``."""
    scale = np.empty(int(bounds[-1]))
    for start, stop in itertools.pairwise(bounds):
        norm = float(np.sqrt(max(row_energy[start:stop].sum(), 0.0)))
        scale[start:stop] = 1.0 / norm if norm > 0 else 1.0
    return scale


def _left_singular(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left singular vectors and squared singular values (descending) of ``matrix``,
    from the eigendecomposition of its Gram matrix on the smaller side: 3-5x faster than
    an SVD on square layers. Energies are accurate to ``eps * s_max^2``, which is all a
    truncation decision needs; directions whose energy is at that noise level are
    dropped (the rank they would add is lossless already). Whatever basis comes out, the
    certificates are computed from the factors actually used, so they stay sound."""
    rows, cols = matrix.shape
    if rows <= cols:
        return _left_singular_gram(matrix @ matrix.T, rows, cols)
    energy, right = _eigh(matrix.T @ matrix)
    energy, right = energy[::-1], right[:, ::-1]
    keep = _resolved(energy, rows, cols)
    energy = np.clip(energy[:keep], 0.0, None)
    basis = (matrix @ right[:, :keep]) / np.sqrt(energy)  # columns U_j
    # re-orthonormalise what rounding bent; QR keeps every leading span, so the first
    # q columns still span the top-q directions
    basis, _ = np.linalg.qr(basis)
    return np.ascontiguousarray(basis), energy


def _left_singular_gram(gram: np.ndarray, rows: int, cols: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_left_singular` of a ``rows x cols`` matrix from its output-side Gram."""
    energy, basis = _eigh(gram)
    energy, basis = energy[::-1], basis[:, ::-1]
    keep = _resolved(energy, rows, cols)
    return np.ascontiguousarray(basis[:, :keep]), np.clip(energy[:keep], 0.0, None)


def _eigh(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric ``gram`` from its lower
    triangle (no symmetrising copy), overwriting it. Divide and conquer (faster) up to
    ``_EVD_SIDE``; past it MRRR, whose workspace is a few vectors rather than divide and
    conquer's two more matrices of the Gram's size (256 MiB at 4096)."""
    driver = "evd" if gram.shape[0] <= _EVD_SIDE else "evr"
    return scipy.linalg.eigh(gram, driver=driver, overwrite_a=True)  # type: ignore[no-any-return]


#: side of the largest Gram decomposed by divide and conquer (:func:`_eigh`)
_EVD_SIDE = 2048


def _resolved(energy: np.ndarray, rows: int, cols: int) -> int:
    """How many leading energies (descending) stand above the rounding noise."""
    if not energy.size:
        return 0
    floor = max(float(energy[0]), 0.0) * max(rows, cols) * np.finfo(float).eps
    return int(np.count_nonzero(energy > floor))


def _norm(rows: np.ndarray) -> float:
    norm = float(np.linalg.norm(rows))
    return norm if norm > 0 else 1.0


def greedy_channel_order(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[list[int], np.ndarray]:
    """Forward selection of channels that best predict the rest, seen by consumers.

    ``pairs`` holds, per consumer, ``(A, C)``: ``A = W^T W`` of its weight over the
    channels (summed over kernel taps) and ``C`` the channels' covariance. Keeping the
    set ``S`` and predicting the others by least squares leaves the output error
    ``tr(A (C - C_:S C_SS^-1 C_S:))`` per consumer. Each step adds the channel that
    lowers the summed error the most (a rank-one update of every Schur complement).

    Returns the order (best first) and ``errors[k]``: the summed relative error of the
    consumers when the first ``k`` channels of the order are kept (``errors[C] = 0``).
    """
    channels = pairs[0][1].shape[0]
    schur = [c.astype(np.float64).copy() for _, c in pairs]
    totals = [max(float(np.trace(a @ c)), 1e-300) for a, c in pairs]
    errors = np.zeros(channels + 1)
    errors[0] = sum(float(np.trace(a @ s)) / t for (a, _), s, t in zip(pairs, schur, totals,
                                                                       strict=True))
    order: list[int] = []
    free = np.ones(channels, dtype=bool)
    for k in range(channels):
        gain = np.zeros(channels)
        for (a, _), s, t in zip(pairs, schur, totals, strict=True):
            diag = np.diag(s).copy()
            ok = diag > 1e-12 * max(float(diag.max()), 1e-300)
            gain += np.where(ok, np.einsum("ij,ij->j", a @ s, s) / np.where(ok, diag, 1.0), 0) / t
        gain[~free] = -np.inf
        # a channel with no variance left gains nothing; take the largest remaining then
        j = int(np.argmax(gain))
        order.append(j)
        free[j] = False
        for index, s in enumerate(schur):
            pivot = s[j, j]
            if pivot > 1e-12 * max(float(np.abs(np.diag(s)).max()), 1e-300):
                schur[index] = s - np.outer(s[:, j], s[j, :]) / pivot
            schur[index][j, :] = 0.0
            schur[index][:, j] = 0.0
        errors[k + 1] = max(
            sum(float(np.trace(a @ s)) / t for (a, _), s, t in zip(pairs, schur, totals,
                                                                   strict=True)),
            0.0,
        )
    errors[channels] = 0.0
    return order, errors


def compensation(
    kept: Sequence[int], cov: np.ndarray, mean: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``mix`` (C x k) and ``shift`` (C,) with ``x ~ mix @ x[kept] + shift`` in the least-
    squares sense for channels of covariance ``cov`` and mean ``mean``."""
    channels = cov.shape[0]
    kept_idx = np.asarray(kept, dtype=int)
    removed = np.setdiff1d(np.arange(channels), kept_idx)
    mix = np.zeros((channels, kept_idx.size))
    mix[kept_idx, np.arange(kept_idx.size)] = 1.0
    shift = np.zeros(channels)
    if removed.size and kept_idx.size:
        c_ss = cov[np.ix_(kept_idx, kept_idx)]
        c_rs = cov[np.ix_(removed, kept_idx)]
        ridge = 1e-8 * max(float(np.trace(c_ss)) / kept_idx.size, 1e-300)
        coef = scipy.linalg.solve(
            c_ss + ridge * np.eye(kept_idx.size), c_rs.T, assume_a="pos"
        ).T  # removed x kept
        mix[removed] = coef
        shift[removed] = mean[removed] - coef @ mean[kept_idx]
    elif removed.size:
        shift[removed] = mean[removed]
    return mix, shift
