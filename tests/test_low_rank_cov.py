"""Covariances of fewer vectors than dimensions held as their factor (``LowRankCov``):
the statistics, the ridge, the projections and a whole compression equal the dense
path, and the ``d x d`` matrix is never made by the planner."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import fixture_path
from onnx import TensorProto, helper, numpy_helper

import models
import qmpass
from qmpass.compress import CompressConfig
from qmpass.compress.calibration import shrunk
from qmpass.plan.factors import projection
from qmpass.verify import StatsRequest, collect_stats, load_calib
from qmpass.verify import stats as stats_module
from qmpass.verify.stats import LowRankCov

RNG = np.random.default_rng(7)


def _linear(d_in: int, d_out: int) -> onnx.ModelProto:
    w = numpy_helper.from_array(RNG.standard_normal((d_in, d_out)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", d_out])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def low_rank_from_64(monkeypatch: pytest.MonkeyPatch) -> None:
    """Vectors 64 wide and wider, fewer than their width, are held as a factor."""
    monkeypatch.setattr(stats_module, "LOW_RANK_WIDTH", 64)
    monkeypatch.setattr(stats_module, "LOW_RANK_SHARE", 1.0)


def test_few_wide_vectors_keep_a_factor_with_the_dense_moments(low_rank_from_64) -> None:
    x = RNG.standard_normal((20, 96)).astype(np.float32) + 3.0
    stats = collect_stats(_linear(96, 8), {"x": x}, {"in": StatsRequest("x", "vectors")},
                          batch=7)["in"]
    held = stats.held_cov
    assert isinstance(held, LowRankCov) and held.factor.shape == (20, 96)
    reference = np.cov(x.astype(np.float64), rowvar=False, bias=True)
    np.testing.assert_allclose(stats.cov, reference, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(stats.variances(), np.diag(reference), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-6)
    # the ridge of too few vectors, on the factor's form, equals the dense one
    ridged = shrunk(stats)
    assert isinstance(ridged.held_cov, LowRankCov)
    dense = reference + np.eye(96) * stats_module_ridge(reference)
    np.testing.assert_allclose(ridged.cov, dense, rtol=1e-9, atol=1e-10)
    # more vectors than the width: the usual d x d sums
    many = RNG.standard_normal((200, 96)).astype(np.float32)
    assert isinstance(collect_stats(_linear(96, 8), {"x": many},
                                    {"in": StatsRequest("x", "vectors")})["in"].held_cov,
                      np.ndarray)


def stats_module_ridge(cov: np.ndarray) -> float:
    from qmpass.compress.calibration import RIDGE
    return RIDGE * float(np.trace(cov)) / cov.shape[0]


@pytest.mark.parametrize("shape", [(12, 40), (40, 12)])
@pytest.mark.parametrize("ridge", [0.0, 0.3])
def test_projection_under_a_factor_equals_it_under_the_matrix(shape, ridge) -> None:
    factor = RNG.standard_normal((5, shape[1]))
    held = LowRankCov(factor, ridge)
    weights = [RNG.standard_normal((shape[0] // 2, shape[1])).astype(np.float32),
               RNG.standard_normal((shape[0] - shape[0] // 2, shape[1])).astype(np.float32)]
    got, want = projection(weights, held), projection(weights, held.load())
    np.testing.assert_allclose(got.energy, want.energy, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(got.scale, want.scale, rtol=1e-10)
    for rank in (1, 3):
        kept = got.basis[:, :rank] @ got.basis[:, :rank].T
        np.testing.assert_allclose(kept, want.basis[:, :rank] @ want.basis[:, :rank].T,
                                   atol=1e-7)


def test_compress_with_factors_equals_it_with_matrices(low_rank_from_64, monkeypatch) -> None:
    """The MLP fixture (48 fitting vectors of 64 and 128 features): the same plan and
    errors whether its input covariances are held as factors or as matrices, and a
    covariance wider than its layer's outputs is never made whole."""
    path = fixture_path("mlp_digits")
    calib = load_calib(models.MODELS_DIR / "mlp_digits_calib.npz", onnx.load(str(path)))
    config = CompressConfig(keep=0.5, calib=calib)
    made = []
    original = LowRankCov.load

    def counted(self: LowRankCov) -> np.ndarray:
        made.append(self.shape)
        return original(self)

    monkeypatch.setattr(LowRankCov, "load", counted)
    _, factored = qmpass.compress(path, config)
    # only the first layer's (64 inputs, 128 outputs: the covariance is the smaller side);
    # the second's 128 x 128 (64 outputs) was never made
    assert made == [(64, 64)]
    monkeypatch.setattr(stats_module, "LOW_RANK_WIDTH", 1 << 30)
    _, dense = qmpass.compress(path, config)
    a, b = factored.to_dict(), dense.to_dict()
    assert [(r["operators"], r["rank"]) for r in a["rewrites"]] == \
        [(r["operators"], r["rank"]) for r in b["rewrites"]]
    assert a["verification"]["relative_error"] == pytest.approx(
        b["verification"]["relative_error"], rel=1e-6)
