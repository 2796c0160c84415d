"""The spectral core: states, metrics and the inequalities qmpass relies on.

Property tests draw operators at random (the inequalities must hold for every matrix);
the checks of behaviour on real spectra use the trained fixtures.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import trained_matrix
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qmpass.spectral import (
    augmented_matrix,
    augmented_singular_values,
    bures_angle,
    fs_distance,
    fs_distance_matrix,
    operator_norm,
    quantum_relative_entropy,
    spectral_state,
    weighted_fs,
)
from qmpass.spectral.paper import gksl_derivative, wasserstein2

finite = st.floats(-3, 3, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def operators(draw, rows=None, cols=None):
    m = rows or draw(st.integers(1, 7))
    n = cols or draw(st.integers(1, 7))
    w = draw(arrays(np.float64, (m, n), elements=finite))
    b = draw(st.one_of(st.none(), arrays(np.float64, (m,), elements=finite)))
    return w, b


def test_gram_path_matches_lapack_on_trained_weights() -> None:
    for shape in [(64, 128), (128, 64), (10, 128)]:
        w = trained_matrix(*shape).astype(np.float64)
        b = trained_matrix(1, shape[0])[0].astype(np.float64)
        gram = spectral_state("g", w, b, "gram")
        svd = spectral_state("s", w, b, "svd")
        # energies agree to rounding of s_max**2; that is all the metrics use
        np.testing.assert_allclose(gram.energy, svd.energy, atol=1e-13)
        np.testing.assert_allclose(gram.singular_values[:10], svd.singular_values[:10], rtol=1e-10)


@given(operators())
def test_state_invariants(op) -> None:
    w, b = op
    state = spectral_state("x", w, b, "svd")
    assert state.singular_values.size == min(w.shape) + 1
    assert np.all(np.diff(state.singular_values) <= 1e-12)
    assert state.energy.sum() == pytest.approx(1.0)
    assert state.energy_profile[-1] == pytest.approx(1.0)
    assert 1.0 - 1e-9 <= state.effective_rank <= state.singular_values.size + 1e-9


@given(operators(), st.floats(0, 3))
def test_rank_for_delta_is_the_smallest_rank_within_the_bound(op, delta) -> None:
    state = spectral_state("x", *op, "svd")
    q = state.rank_for_delta(delta)
    assert -np.log(state.energy_kept(q)) <= delta + 1e-9
    if q > 1:
        assert -np.log(state.energy_kept(q - 1)) > delta - 1e-9


def test_relative_entropy_closed_form_matches_direct_computation() -> None:
    w = trained_matrix(12, 20).astype(np.float64)
    a = augmented_matrix(w, trained_matrix(1, 12)[0])
    rho = a.T @ a / np.sum(a**2)
    values, vectors = np.linalg.eigh(rho)
    order = np.argsort(values)[::-1]
    state = spectral_state("x", w, trained_matrix(1, 12)[0], "svd")
    for q in (1, 3, 6, 13):
        top = vectors[:, order[:q]]
        rho_q = top @ np.diag(values[order[:q]]) @ top.T
        rho_q /= np.trace(rho_q)
        direct = quantum_relative_entropy(rho_q, rho)
        assert direct == pytest.approx(-np.log(state.energy_kept(q)), abs=1e-9)


@given(st.data())
def test_fs_range_symmetry_and_fs_below_bures(data) -> None:
    cols = data.draw(st.integers(1, 6))
    w1, b1 = data.draw(operators(cols=cols))
    w2, b2 = data.draw(operators(cols=cols))
    s1, s2 = spectral_state("a", w1, b1, "svd"), spectral_state("b", w2, b2, "svd")
    d12, d21 = fs_distance(s1.energy, s2.energy), fs_distance(s2.energy, s1.energy)
    assert 0.0 <= d12 <= np.pi / 2 and d12 == pytest.approx(d21)
    a1, a2 = augmented_matrix(w1, b1), augmented_matrix(w2, b2)
    bures = bures_angle(a1, a2)
    assert bures == pytest.approx(bures_angle(a2, a1), abs=1e-7)
    assert d12 <= bures + 1e-7


@given(operators(rows=5, cols=4), arrays(np.float64, (5, 4), elements=finite))
def test_mirsky_and_weyl(op, delta) -> None:
    w, _ = op
    s1 = np.linalg.svd(w, compute_uv=False)
    s2 = np.linalg.svd(w + delta, compute_uv=False)
    assert np.linalg.norm(s1 - s2) <= np.linalg.norm(delta) + 1e-9  # Mirsky
    assert np.max(np.abs(s1 - s2)) <= np.linalg.norm(delta, 2) + 1e-9  # Weyl


@settings(max_examples=60)
@given(operators(rows=6, cols=5), st.integers(0, 5), st.integers(0, 2**32 - 1))
def test_certificate_is_never_violated(op, rank, seed) -> None:
    """The plan's certificate, ``R ||W - W'||_op + ||b - b'||`` with ``operator_norm``
    (qmpass.plan.units), bounds the change of a 1-Lipschitz activation's output; for a
    truncated SVD with the bias kept it is ``R sigma_{q+1}``."""
    w, b = op
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    w_q = (u[:, :rank] * s[:rank]) @ vt[:rank]
    radius = 2.0
    cert = radius * operator_norm(w - w_q) + 0.0  # the bias is kept: ||b - b'|| = 0
    tail = float(s[rank]) if rank < s.size else 0.0
    assert cert == pytest.approx(radius * tail, abs=1e-9)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((200, 5))
    x *= radius * rng.uniform(0, 1, (200, 1)) / np.linalg.norm(x, axis=1, keepdims=True)
    x = np.vstack([x, radius * vt[min(rank, vt.shape[0] - 1)]])  # the worst direction
    bias = 0.0 if b is None else b
    relu = np.maximum
    gap = np.linalg.norm(relu(x @ w.T + bias, 0) - relu(x @ w_q.T + bias, 0), axis=1)
    assert np.all(gap <= cert + 1e-9)


def test_bures_is_zero_exactly_for_an_output_rotation() -> None:
    a = augmented_matrix(trained_matrix(9, 6).astype(np.float64), None)
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((10, 10)))
    assert bures_angle(a, q @ a) < 1e-6
    b = augmented_matrix(trained_matrix(9, 6)[:, ::-1].astype(np.float64), None)
    assert bures_angle(a, b) > 0.05
    tall = augmented_matrix(trained_matrix(40, 6).astype(np.float64), None)  # QR-reduced path
    assert bures_angle(tall, tall) < 1e-6


def test_fs_matrix_equals_pairwise() -> None:
    states = [spectral_state(str(k), trained_matrix(8 + 4 * k, 16), None) for k in range(4)]
    matrix = fs_distance_matrix(states)
    for i, si in enumerate(states):
        for j, sj in enumerate(states):
            assert matrix[i, j] == pytest.approx(fs_distance(si.energy, sj.energy), abs=1e-7)


def test_wasserstein2_matches_a_linear_program() -> None:
    from scipy.optimize import linprog

    rng = np.random.default_rng(3)
    p1, p2 = rng.dirichlet(np.ones(5)), rng.dirichlet(np.ones(7))
    cost = (np.arange(5)[:, None] - np.arange(7)[None, :]) ** 2.0
    rows = np.kron(np.eye(5), np.ones(7))
    cols = np.kron(np.ones(5), np.eye(7))
    plan = linprog(cost.ravel(), A_eq=np.vstack([rows, cols]), b_eq=np.concatenate([p1, p2]))
    assert wasserstein2(p1, p2) == pytest.approx(np.sqrt(plan.fun), rel=1e-6)


def test_weighted_fs_weights_the_squared_terms() -> None:
    conv = spectral_state("c", trained_matrix(8, 16), None)
    conv2 = spectral_state("c2", trained_matrix(16, 8), None)
    mm = spectral_state("m", trained_matrix(6, 6), None)
    mm2 = spectral_state("m2", trained_matrix(6, 12), None)
    d_conv, d_mm = fs_distance(conv.energy, conv2.energy), fs_distance(mm.energy, mm2.energy)
    got = weighted_fs([("Conv", conv), ("MatMul", mm)], [("Conv", conv2), ("MatMul", mm2)],
                      {"Conv": 1.2})
    assert got == pytest.approx(np.sqrt(1.2 * d_conv**2 + d_mm**2))


def test_gksl_preserves_trace_and_hermiticity() -> None:
    rng = np.random.default_rng(0)
    h = rng.standard_normal((4, 4))
    h = h + h.T
    jumps = [rng.standard_normal((4, 4)) for _ in range(2)]
    rho = np.diag([0.4, 0.3, 0.2, 0.1]).astype(complex)
    d = gksl_derivative(rho, h, jumps)
    assert abs(np.trace(d)) < 1e-12
    np.testing.assert_allclose(d, d.conj().T, atol=1e-12)


def test_singular_value_count_of_a_wide_and_tall_operator() -> None:
    assert augmented_singular_values(trained_matrix(3, 9), None).size == 4
    assert augmented_singular_values(trained_matrix(9, 3), None).size == 4
