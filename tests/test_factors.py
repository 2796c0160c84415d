"""The decompositions behind low-rank, shared-basis and pruning steps, against the
closed forms of docs/DESIGN.md computed here with plain numpy."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import trained_matrix

from qmpass.plan.factors import (
    ActivationScaled,
    compensation,
    greedy_channel_order,
    projection,
    sqrt_psd,
)


def _covariance(d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) * np.linspace(2.0, 0.05, d)
    return mix @ mix.T / d


def test_data_free_projection_is_the_truncated_svd() -> None:
    w = trained_matrix(48, 64).astype(np.float64)
    proj = projection([w], None)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    for rank in (1, 7, 30):
        first, second = proj.factors(rank)
        assert first.shape == (rank, 64) and second.shape == (48, rank)
        expected = (u[:, :rank] * s[:rank]) @ vt[:rank]
        np.testing.assert_allclose(second @ first, expected, atol=1e-10)
        # the predicted error is the relative tail energy
        assert proj.tail(rank) == pytest.approx(np.sum(s[rank:] ** 2) / np.sum(s**2))


@pytest.mark.parametrize("shape", [(32, 40), (40, 32)])  # output-side Gram, or C^(1/2)
def test_whitened_projection_reaches_the_design_optimum(shape: tuple[int, int]) -> None:
    w = trained_matrix(*shape).astype(np.float64)
    cov = _covariance(shape[1])
    root = sqrt_psd(cov)
    np.testing.assert_allclose(root @ root, cov, atol=1e-10)
    proj = projection([w], cov)
    rank = 10
    first, second = proj.factors(rank)
    # docs/DESIGN.md: W' = [W C^(1/2)]_q C^(-1/2)
    u, s, vt = np.linalg.svd(w @ root)
    optimum = (u[:, :rank] * s[:rank]) @ vt[:rank] @ np.linalg.inv(root)
    np.testing.assert_allclose(second @ first, optimum, atol=1e-8)

    def error(approx: np.ndarray) -> float:
        return float(np.trace((w - approx) @ cov @ (w - approx).T))

    plain = projection([w], None).factors(rank)
    assert error(second @ first) < error(plain[1] @ plain[0])
    assert proj.tail(rank) == pytest.approx(error(second @ first) / np.trace(w @ cov @ w.T))


def test_shared_basis_member_errors_sum_to_the_tail() -> None:
    base = trained_matrix(96, 64).astype(np.float64)
    members = [base[:32], base[32:64], base[64:]]
    proj = projection(members, None)
    first, second = proj.factors(20)
    errors = proj.member_errors(20)
    assert errors.sum() == pytest.approx(proj.tail(20))
    stacked = second @ first
    for i, w in enumerate(members):
        rows = stacked[32 * i: 32 * (i + 1)]
        assert errors[i] == pytest.approx(np.linalg.norm(w - rows) ** 2 / np.linalg.norm(w) ** 2)


def test_compensation_is_exact_for_dependent_channels() -> None:
    rng = np.random.default_rng(1)
    kept_data = rng.standard_normal((500, 3)) + np.array([1.0, -2.0, 0.5])
    combo = np.array([[0.5, -1.0, 2.0], [1.0, 1.0, 0.0]])
    data = np.column_stack([kept_data[:, 0], kept_data @ combo[0] + 3.0, kept_data[:, 1],
                            kept_data @ combo[1] - 1.0, kept_data[:, 2]])
    mix, shift = compensation([0, 2, 4], np.cov(data.T), data.mean(axis=0))
    np.testing.assert_allclose(data[:, [0, 2, 4]] @ mix.T + shift, data, atol=1e-6)


def test_greedy_keeps_independent_channels_first() -> None:
    rng = np.random.default_rng(2)
    base = rng.standard_normal((400, 3))
    data = np.column_stack([base, base @ rng.standard_normal((3, 3))])  # 3 dependent copies
    consumer = rng.standard_normal((4, 6))
    order, errors = greedy_channel_order([(consumer.T @ consumer, np.cov(data.T))])
    assert errors[0] == pytest.approx(1.0)
    assert np.all(np.diff(errors) <= 1e-12)  # keeping more never predicts more error
    assert errors[3] == pytest.approx(0.0, abs=1e-9)  # three channels explain all six
    assert len(set(order)) == 6


def test_shared_basis_is_the_top_eigenspace_of_the_cluster_state() -> None:
    """docs/DESIGN.md: rho_C = mean of the members' input-side states; member i keeps
    tr(P_q rho_i) of its energy."""
    base = trained_matrix(96, 64).astype(np.float64)
    members = [base[:32], base[32:64], base[64:]]
    rhos = [w.T @ w / np.linalg.norm(w) ** 2 for w in members]
    _, vectors = np.linalg.eigh(sum(rhos) / 3)
    rank = 12
    top = vectors[:, ::-1][:, :rank]
    proj = projection(members, None)
    first, _ = proj.factors(rank)
    # the rows of `first` span the same subspace as the top eigenvectors of rho_C
    q_first, _ = np.linalg.qr(first.T)
    np.testing.assert_allclose(q_first @ q_first.T, top @ top.T, atol=1e-8)
    kept = np.array([np.trace(top @ top.T @ rho) for rho in rhos])
    np.testing.assert_allclose(proj.member_errors(rank), 1 - kept, atol=1e-10)


def test_ranks_past_the_numerical_rank_are_padded_and_exact() -> None:
    w = trained_matrix(32, 40).astype(np.float64)
    low = w[:, :6] @ np.linalg.pinv(w[:, :6]) @ w  # rank 6, trained column space
    proj = projection([low], None)
    assert proj.rank == 6
    first, second = proj.factors(8)
    assert first.shape == (8, 40) and second.shape == (32, 8)
    np.testing.assert_allclose(second @ first, low, atol=1e-9)
    assert proj.tail(8) == 0.0 and proj.member_errors(8)[0] == 0.0


class _Stats:
    """Moments of sampled vectors, as the planner reads them."""

    def __init__(self, x: np.ndarray) -> None:
        self.mean = x.mean(axis=0)
        self.cov = np.cov(x, rowvar=False, bias=True)
        self.max_norm = float(np.linalg.norm(x, axis=1).max())


@pytest.mark.parametrize("shape", [(32, 40), (40, 32)])  # output-side Gram, or S itself
def test_asvd_truncates_the_activation_scaled_weight(shape: tuple[int, int]) -> None:
    """ASVD (Yuan et al. 2023): W' = [W S]_q S^-1 with S = diag(sqrt(E[x_j^2]))^0.5."""
    w = trained_matrix(*shape).astype(np.float64)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, shape[1])) * np.geomspace(0.05, 20.0, shape[1]) + 0.3
    scaled = ActivationScaled(_Stats(x))
    s = np.sqrt(np.sqrt(np.mean(x**2, axis=0)))  # alpha = 0.5 of the channels' RMS
    np.testing.assert_allclose(scaled.cov, np.diag(s**2), rtol=1e-10)
    assert not scaled.mean.any()  # ASVD leaves the bias alone
    rank = 10
    first, second = projection([w], scaled.cov).factors(rank)
    u, sv, vt = np.linalg.svd(w * s)
    np.testing.assert_allclose(second @ first, (u[:, :rank] * sv[:rank]) @ vt[:rank] / s,
                               atol=1e-8)

    def output_error(approx: np.ndarray) -> float:
        return float(np.linalg.norm(x @ (w - approx).T))

    plain = projection([w], None).factors(rank)
    assert output_error(second @ first) < output_error(plain[1] @ plain[0])
