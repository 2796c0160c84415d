"""Claims of the source paper that are false, kept as counterexamples.

qmpass never relies on them: spectra are used only as a filter that rules pairs out, and
every guarantee it prints comes from the certificates of plan steps (qmpass/plan/units/,
checked by tests/test_certificates.py). The paper's formulas used here live in
qmpass/spectral/paper.py, which nothing else imports.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import trained_matrix

from qmpass.spectral import fs_distance
from qmpass.spectral.paper import gksl_derivative, paper_eq7_derivative, wasserstein2


def test_equal_spectra_do_not_mean_equal_functions() -> None:
    """Theorem 2.1's corollary: d_FS = 0 and equal norms "imply exact equivalence"."""
    w = trained_matrix(16, 16).astype(np.float64)
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((16, 16)))
    rotated = q @ w
    s, s_rot = np.linalg.svd(w, compute_uv=False), np.linalg.svd(rotated, compute_uv=False)
    p, p_rot = s**2 / np.sum(s**2), s_rot**2 / np.sum(s_rot**2)
    assert fs_distance(p, p_rot) == pytest.approx(0.0, abs=1e-7)
    assert np.linalg.norm(w) == pytest.approx(np.linalg.norm(rotated))
    x = np.random.default_rng(1).standard_normal((32, 16))
    relative = np.linalg.norm(x @ w.T - x @ rotated.T) / np.linalg.norm(x @ w.T)
    assert relative > 0.5  # the outputs are nowhere near each other


@pytest.mark.parametrize("eps", [1e-2, 1e-3, 1e-4])
def test_w2_is_not_bounded_by_sqrt2_times_fs(eps: float) -> None:
    """Eq. (3), W2(F1, F2) <= sqrt(2) d_FS, fails: W2 = sqrt(eps) while d_FS = O(eps)."""
    p1, p2 = np.array([0.5, 0.5]), np.array([0.5 + eps, 0.5 - eps])
    w2, fs = wasserstein2(p1, p2), fs_distance(p1, p2)
    assert w2 == pytest.approx(np.sqrt(eps))
    assert w2 > np.sqrt(2) * fs


def test_sigma_profile_is_not_a_cdf() -> None:
    """The 'majorization profile' cumulates sigma/||sigma||_2: it ends at
    nuclear / Frobenius >= 1, not at 1. qmpass cumulates p = sigma**2 instead."""
    s = np.linalg.svd(trained_matrix(32, 64), compute_uv=False)
    profile = np.cumsum(s / np.linalg.norm(s))
    assert profile[-1] == pytest.approx(np.sum(s) / np.linalg.norm(s))
    assert profile[-1] > 1.5


def test_eq7_is_not_trace_preserving() -> None:
    rng = np.random.default_rng(0)
    h = rng.standard_normal((3, 3))
    h = h + h.T
    jumps = [rng.standard_normal((3, 3))]
    rho = np.diag([0.5, 0.3, 0.2]).astype(complex)
    assert abs(np.trace(paper_eq7_derivative(rho, h, jumps))) > 1e-2
    assert abs(np.trace(gksl_derivative(rho, h, jumps))) < 1e-12
