"""The verification layer: inputs, batched runs, comparison and calibration statistics.

Golden values come from numpy references computed here (a loop-based im2col, ``np.cov``),
or from onnxruntime running the Conv itself: the patches ``x`` of a Conv must satisfy
``y = W_mat @ x + b`` at every output position.
"""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import const, fixture_path, make_model, tensor, trained_conv, trained_matrix
from onnx import TensorProto, helper

import models
from qmpass.errors import QmpassInputError
from qmpass.extract import ConvGeometry
from qmpass.verify import (
    StatsRequest,
    TensorStats,
    Verifier,
    accuracy,
    collect_stats,
    compare,
    load_calib,
    run_batched,
    run_model,
    synthesize_inputs,
)

RNG = np.random.default_rng(7)


def test_public_api_of_verify_is_small() -> None:
    import qmpass.verify

    assert sorted(qmpass.verify.__all__) == [
        "DEFAULT_BATCH", "StatsRequest", "TensorStats", "Verification", "Verifier",
        "accuracy", "check_feeds", "collect_stats", "compare", "load_calib", "run_batched",
        "run_model", "session", "synthesize_inputs",
    ]


# -- models ------------------------------------------------------------------------------
def mlp() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """x (batch, 5, 16) -> MatMul W1 -> Relu -> MatMul W2 -> y: trained weights."""
    w1 = trained_matrix(24, 16).T  # MatMul weights are stored d_in x d_out
    w2 = trained_matrix(8, 24).T
    model = make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("Relu", ["h"], ["a"]),
         helper.make_node("MatMul", ["a", "w2"], ["y"])],
        [tensor("x", ["batch", 5, 16])],
        [tensor("y", ["batch", 5, 8])],
        [const("w1", w1), const("w2", w2)],
    )
    return model, w1, w2


def conv_model(geometry: ConvGeometry, c_in: int, c_out: int, spatial: list[int],
               weight: np.ndarray | None = None) -> tuple[onnx.ModelProto, np.ndarray]:
    """x -> Relu -> Conv(geometry) -> y, so that the Conv reads an intermediate tensor."""
    rank = len(geometry.kernel_shape)
    if weight is None:
        weight = RNG.standard_normal((c_out, c_in, *geometry.kernel_shape)).astype(np.float32)
    attrs: dict[str, Any] = {"kernel_shape": list(geometry.kernel_shape),
                                "strides": list(geometry.strides),
                                "dilations": list(geometry.dilations)}
    if geometry.auto_pad == "NOTSET":
        attrs["pads"] = list(geometry.pads)
    else:
        attrs["auto_pad"] = geometry.auto_pad
    model = make_model(
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("Conv", ["r", "w"], ["y"], **attrs)],
        [tensor("x", ["batch", c_in, *spatial])],
        [tensor("y", ["batch", c_out, *(f"o{i}" for i in range(rank))])],
        [const("w", weight)],
    )
    assert rank == len(spatial)
    return model, weight.astype(np.float64)


def im2col_loops(x: np.ndarray, kernel: tuple[int, int], strides: tuple[int, int],
                 pads: tuple[int, int, int, int], dilations: tuple[int, int]) -> np.ndarray:
    """The receptive fields of a 2-D Conv, one row per (sample, output row, output col),
    values ordered (channel, kernel row, kernel col): written as plainly as possible."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    top, left, bottom, right = pads
    out_h = (h + top + bottom - (kh - 1) * dh - 1) // sh + 1
    out_w = (w + left + right - (kw - 1) * dw - 1) // sw + 1
    rows = []
    for i in range(n):
        for oh in range(out_h):
            for ow in range(out_w):
                row = []
                for ch in range(c):
                    for ki in range(kh):
                        for kj in range(kw):
                            hh = oh * sh - top + ki * dh
                            ww = ow * sw - left + kj * dw
                            inside = 0 <= hh < h and 0 <= ww < w
                            row.append(x[i, ch, hh, ww] if inside else 0.0)
                rows.append(row)
    return np.asarray(rows, dtype=np.float64)


def assert_stats_equal(stats: TensorStats, vectors: np.ndarray) -> None:
    """``stats`` are those of the rows of ``vectors`` (independent numpy reference)."""
    x = vectors.astype(np.float64)
    assert stats.count == x.shape[0]
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False, bias=True),
                               rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(stats.second_moment, x.T @ x / x.shape[0],
                               rtol=1e-9, atol=1e-10)
    assert stats.max_norm == pytest.approx(np.linalg.norm(x, axis=1).max(), rel=1e-12)


# -- statistics: vectors -----------------------------------------------------------------
def test_vectors_of_matmul_inputs_equal_numpy_moments() -> None:
    model, w1, _ = mlp()
    x = RNG.standard_normal((37, 5, 16)).astype(np.float32)
    requests = {"in": StatsRequest("x", "vectors"), "hidden": StatsRequest("a", "vectors")}
    stats = collect_stats(model, {"x": x}, requests)

    assert_stats_equal(stats["in"], x.reshape(-1, 16))
    hidden = np.maximum(x.astype(np.float64) @ w1.astype(np.float64), 0.0).reshape(-1, 24)
    assert stats["hidden"].tensor == "a"
    # the activation itself is float32 in onnxruntime: compare at float32 precision
    np.testing.assert_allclose(stats["hidden"].mean, hidden.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["hidden"].cov, np.cov(hidden, rowvar=False, bias=True),
                               rtol=1e-4, atol=1e-5)
    assert stats["hidden"].count == 37 * 5


def test_statistics_past_a_memory_bound_run_in_passes_and_wait_on_disk() -> None:
    model, _, _ = mlp()
    x = RNG.standard_normal((37, 5, 16)).astype(np.float32)
    requests = {"in": StatsRequest("x", "vectors"), "hidden": StatsRequest("a", "vectors")}
    whole = collect_stats(model, {"x": x}, requests)
    parted = collect_stats(model, {"x": x}, requests, max_bytes=8 * 24 * 24)  # one each
    assert not whole["hidden"].spilled and parted["hidden"].spilled
    for key in requests:
        np.testing.assert_array_equal(parted[key].cov, whole[key].cov)
        np.testing.assert_array_equal(parted[key].mean, whole[key].mean)
    held = parted["hidden"].cov
    assert parted["hidden"].cov is held  # one copy while in use
    path = parted["hidden"].__dict__["_cov"].path
    del parted, held
    gc.collect()
    assert not Path(path).exists()  # the file goes with its statistics


def test_vectors_along_the_channel_axis_of_an_nchw_activation() -> None:
    x = RNG.standard_normal((6, 3, 4, 5)).astype(np.float32)
    model = make_model([helper.make_node("Relu", ["x"], ["r"])], [tensor("x", ["n", 3, 4, 5])],
                       [tensor("r", ["n", 3, 4, 5])])
    stats = collect_stats(model, {"x": x}, {"c": StatsRequest("r", "vectors", axis=1)})["c"]
    assert_stats_equal(stats, np.moveaxis(np.maximum(x, 0), 1, -1).reshape(-1, 3))


def test_statistics_of_a_constant_are_counted_once_whatever_the_batches() -> None:
    model, w1, _ = mlp()
    x = RNG.standard_normal((20, 5, 16)).astype(np.float32)
    stats = collect_stats(model, {"x": x}, {"w": StatsRequest("w1", "vectors", axis=0)},
                          batch=3)["w"]
    assert_stats_equal(stats, w1.T)


# -- statistics: patches -----------------------------------------------------------------
def test_patches_equal_a_loop_im2col_with_padding_stride_and_dilation() -> None:
    geometry = ConvGeometry(kernel_shape=(3, 2), strides=(2, 2), pads=(1, 2, 0, 1),
                            dilations=(2, 2), groups=1)
    weight = trained_conv(4, 3, 3)[:, :, :, :2]
    model, w = conv_model(geometry, 3, 4, [9, 8], weight)
    x = RNG.standard_normal((3, 3, 9, 8)).astype(np.float32)
    stats = collect_stats(model, {"x": x},
                          {"p": StatsRequest("r", "patches", geometry=geometry)})["p"]

    patches = im2col_loops(np.maximum(x, 0), (3, 2), (2, 2), (1, 2, 0, 1), (2, 2))
    assert_stats_equal(stats, patches)
    # ordering: the Conv weight reshaped (Cout, Cin*kh*kw) applied to a patch is the output
    (y,) = run_model(model, {"x": x})
    per_position = np.moveaxis(y, 1, -1).reshape(-1, 4).astype(np.float64)
    np.testing.assert_allclose(patches @ w.reshape(4, -1).T, per_position, atol=1e-4)


@pytest.mark.parametrize(
    "geometry, spatial",
    [
        (ConvGeometry((3,), (2,), (2, 1), (2,), 1), [11]),
        (ConvGeometry((2, 3, 2), (1, 2, 1), (1, 0, 1, 0, 1, 1), (1, 1, 2), 1), [4, 5, 6]),
        (ConvGeometry((3, 3), (2, 2), (0, 0, 0, 0), (1, 1), 1, "SAME_UPPER"), [7, 6]),
        (ConvGeometry((2, 2), (1, 1), (0, 0, 0, 0), (1, 1), 1, "SAME_LOWER"), [5, 5]),
    ],
)
def test_patch_moments_reproduce_the_conv_output_moments(
    geometry: ConvGeometry, spatial: list[int]
) -> None:
    """For y = W_mat x at each position: E[y] = W_mat E[x], E[y y^T] = W_mat E[x x^T] W_mat^T
    (1-D, 3-D and auto_pad, checked against onnxruntime's own Conv)."""
    model, w = conv_model(geometry, 2, 3, spatial)
    x = RNG.standard_normal((4, 2, *spatial)).astype(np.float32)
    stats = collect_stats(model, {"x": x},
                          {"p": StatsRequest("r", "patches", geometry=geometry)})["p"]
    (y,) = run_model(model, {"x": x})
    outputs = np.moveaxis(y, 1, -1).reshape(-1, 3).astype(np.float64)
    w_mat = w.reshape(3, -1)
    assert stats.count == outputs.shape[0]
    np.testing.assert_allclose(w_mat @ stats.mean, outputs.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(w_mat @ stats.second_moment @ w_mat.T,
                               outputs.T @ outputs / outputs.shape[0], rtol=1e-5, atol=1e-5)


def test_batching_gives_the_statistics_of_one_run() -> None:
    geometry = ConvGeometry((3, 3), (2, 2), (1, 1, 1, 1), (2, 2), 1)
    model, _ = conv_model(geometry, 3, 4, [8, 8])
    x = RNG.standard_normal((23, 3, 8, 8)).astype(np.float32)
    requests = {"p": StatsRequest("r", "patches", geometry=geometry),
                "v": StatsRequest("y", "vectors", axis=1),
                "x": StatsRequest("x", "vectors", axis=1)}
    whole = collect_stats(model, {"x": x}, requests, batch=1000)
    batched = collect_stats(model, {"x": x}, requests, batch=5)
    for key in requests:
        assert batched[key].count == whole[key].count
        np.testing.assert_allclose(batched[key].mean, whole[key].mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(batched[key].cov, whole[key].cov, rtol=1e-10, atol=1e-12)
        assert batched[key].max_norm == whole[key].max_norm


def test_max_vectors_subsamples_the_moments_but_not_the_max_norm() -> None:
    model, _, _ = mlp()
    x = RNG.standard_normal((200, 5, 16)).astype(np.float32)
    request = {"x": StatsRequest("x", "vectors")}
    full = collect_stats(model, {"x": x}, request)["x"]
    sampled = collect_stats(model, {"x": x}, request, batch=50, max_vectors=100)["x"]
    assert 50 < sampled.count < 150  # Bernoulli sample of about 100 of the 1000 vectors
    assert sampled.max_norm == full.max_norm
    again = collect_stats(model, {"x": x}, request, batch=50, max_vectors=100)["x"]
    np.testing.assert_array_equal(again.cov, sampled.cov)  # seeded


def test_collect_stats_does_not_change_the_model() -> None:
    model, _, _ = mlp()
    before = model.SerializeToString()
    x = RNG.standard_normal((4, 5, 16)).astype(np.float32)
    collect_stats(model, {"x": x}, {"h": StatsRequest("h", "vectors"),
                                    "y": StatsRequest("y", "vectors")})
    assert model.SerializeToString() == before


def test_whitener_is_a_square_root_and_its_pseudo_inverse() -> None:
    model, _, _ = mlp()
    x = RNG.standard_normal((9, 5, 16)).astype(np.float32)
    stats = collect_stats(model, {"x": x}, {"a": StatsRequest("a", "vectors")})["a"]
    for centred, matrix in ((False, stats.second_moment), (True, stats.cov)):
        root, inverse = stats.whitener(centred=centred)
        np.testing.assert_allclose(root @ root, matrix, atol=1e-10)
        np.testing.assert_allclose(root @ inverse @ root, root, atol=1e-8)


def test_requests_are_checked() -> None:
    with pytest.raises(ValueError, match="geometry"):
        StatsRequest("x", "patches")
    with pytest.raises(ValueError, match="grouped"):
        StatsRequest("x", "patches", geometry=ConvGeometry((3, 3), (1, 1), (0,) * 4, (1, 1), 2))
    model, _, _ = mlp()
    with pytest.raises(ValueError, match="nowhere"):
        collect_stats(model, {"x": np.zeros((1, 5, 16), np.float32)},
                      {"n": StatsRequest("nowhere", "vectors")})


# -- running and comparing ---------------------------------------------------------------
def test_run_batched_equals_one_run_and_falls_back_when_outputs_mix_samples() -> None:
    model, _, _ = mlp()
    x = RNG.standard_normal((50, 5, 16)).astype(np.float32)
    (whole,) = run_model(model, {"x": x})
    (batched,) = run_batched(model, {"x": x}, batch=8)
    np.testing.assert_array_equal(batched, whole)

    summed = make_model([helper.make_node("ReduceSum", ["x"], ["s"], keepdims=1)],
                        [tensor("x", ["batch", 3])], [tensor("s", [1, 1])])
    x2 = RNG.standard_normal((10, 3)).astype(np.float32)
    (total,) = run_batched(summed, {"x": x2}, batch=4)
    np.testing.assert_allclose(total, [[x2.sum()]], rtol=1e-5)


def test_compare_on_known_arrays() -> None:
    reference = [np.array([[3.0, 4.0]]), np.array([0.0, 12.0])]
    candidate = [np.array([[3.0, 5.0]]), np.array([0.0, 12.0])]
    result = compare(reference, candidate, inputs=1)
    assert result.max_abs_error == 1.0
    assert result.relative_error == pytest.approx(1.0 / 13.0)  # ||(0, 1, 0, 0)|| / 13
    assert result.per_output == pytest.approx((0.2, 0.0))
    document = result.to_dict()
    assert set(document) == {"max_abs_error", "relative_error", "inputs", "per_output"}
    assert json.loads(json.dumps(document)) == document

    zero = compare([np.zeros(3)], [np.zeros(3)], inputs=3)
    assert zero.relative_error == 0.0
    broken = compare([np.zeros(3)], [np.array([0.0, 1e-9, 0.0])], inputs=3)
    assert broken.relative_error == math.inf and broken.to_dict()["relative_error"] is None
    nan = compare([np.ones(2)], [np.array([1.0, np.nan])], inputs=2)
    assert nan.relative_error == math.inf and not nan.relative_error <= 1e6
    with pytest.raises(ValueError, match="shape"):
        compare([np.ones(2)], [np.ones(3)], inputs=1)


def test_verifier_measures_a_perturbed_candidate() -> None:
    """A linear model y = x W against y' = x (1.01 W): relative error exactly 0.01."""
    w = trained_matrix(10, 16).T
    x = RNG.standard_normal((70, 16)).astype(np.float32)

    def linear(weight: np.ndarray) -> onnx.ModelProto:
        return make_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                          [tensor("x", ["batch", 16])], [tensor("y", ["batch", 10])],
                          [const("w", weight)])

    verifier = Verifier(linear(w), {"x": x}, batch=16)
    assert verifier.inputs == 70
    exact = verifier.check(linear(w))
    assert exact.relative_error == 0.0 and exact.inputs == 70
    scaled = verifier.check(linear(np.float32(1.01) * w))
    assert scaled.relative_error == pytest.approx(0.01, rel=1e-4)


def test_accuracy_of_a_fixture_matches_its_metadata() -> None:
    model = onnx.load(str(fixture_path("mlp_digits")))
    x, y = models.load_test_split("mlp_digits")
    meta = json.loads(fixture_path("mlp_digits").with_suffix(".json").read_text())
    assert accuracy(model, {"input": x}, y, batch=100) == pytest.approx(
        meta["test_accuracy"], abs=1e-6)


# -- inputs ------------------------------------------------------------------------------
def test_synthesized_inputs_run_every_fixture_with_the_requested_batch(
    fixture_names: list[str],
) -> None:
    for name in fixture_names:
        model = onnx.load(str(fixture_path(name)))
        feeds = synthesize_inputs(model, count=33, seed=1)
        assert list(feeds) == ["input"]
        (declared,) = [i for i in model.graph.input if i.name == "input"]
        dims = [d.dim_value for d in declared.type.tensor_type.shape.dim]
        assert feeds["input"].shape == (33, *dims[1:])
        assert feeds["input"].dtype == np.float32
        (logits,) = run_batched(model, feeds, batch=10)
        assert logits.shape == (33, 10) and np.isfinite(logits).all()
        again = synthesize_inputs(model, count=33, seed=1)
        np.testing.assert_array_equal(again["input"], feeds["input"])


def test_integer_inputs_feeding_gather_get_indices_in_range() -> None:
    table = RNG.standard_normal((7, 4)).astype(np.float32)
    model = make_model(
        [helper.make_node("Gather", ["table", "ids"], ["e"], axis=0),
         helper.make_node("Cast", ["flag"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["e", "f"], ["em"]),
         helper.make_node("Mul", ["em", "m"], ["y"])],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("flag", TensorProto.INT32, ["batch", "seq", 1]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", "seq", 1])],
        [tensor("y", ["batch", "seq", 4])],
        [const("table", table)],
    )
    feeds = synthesize_inputs(model, count=500, dims={"seq": 3})
    ids = feeds["ids"]
    assert ids.shape == (500, 3) and ids.dtype == np.int64
    assert ids.min() == 0 and ids.max() == 6  # every row of the table, none past it
    assert set(np.unique(feeds["flag"])) == {0, 1} and feeds["flag"].dtype == np.int32
    assert feeds["mask"].dtype == np.bool_ and 0 < feeds["mask"].mean() < 1
    (y,) = run_model(model, feeds)
    np.testing.assert_allclose(y, table[ids] * feeds["flag"] * feeds["mask"], rtol=1e-6)


def test_fixture_calibration_files_are_keyed_by_graph_input_names(
    fixture_names: list[str],
) -> None:
    for name in fixture_names:
        model = onnx.load(str(fixture_path(name)))
        path = models.MODELS_DIR / f"{name}_calib.npz"
        feeds = load_calib(path, model)
        np.testing.assert_array_equal(feeds["input"], models.load_calib(name)["input"])


@pytest.fixture
def calib_model() -> onnx.ModelProto:
    return make_model(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        [tensor("a", ["batch", 3]), tensor("b", ["batch", 3])],
        [tensor("y", ["batch", 3])],
    )


def test_load_calib_casts_to_the_input_type(tmp_path: Path, calib_model: onnx.ModelProto
                                            ) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, a=np.ones((4, 3)), b=np.arange(12).reshape(4, 3))
    feeds = load_calib(path, calib_model)
    assert list(feeds) == ["a", "b"]
    assert all(v.dtype == np.float32 for v in feeds.values())
    np.testing.assert_array_equal(feeds["b"], np.arange(12).reshape(4, 3))


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"a": np.ones((4, 3))}, "no array for graph input.*'b'"),
        ({"a": np.ones((4, 3)), "b": np.ones((4, 3)), "c": np.ones(1)}, "unknown key.*'c'"),
        ({"a": np.ones((4, 3)), "b": np.ones((4, 2))}, "'b' has shape \\(4, 2\\).*dimension 1"),
        ({"a": np.ones((4, 3, 1)), "b": np.ones((4, 3))}, "'a' has shape .*rank 2"),
        ({"a": np.full((4, 3), np.nan), "b": np.ones((4, 3))}, "12 non-finite"),
        ({"a": np.ones((4, 3)), "b": np.ones((5, 3))}, "disagree on .*batch.*4 vs 5"),
        ({"a": np.ones((0, 3)), "b": np.ones((0, 3))}, "empty"),
        ({"a": np.array([["x"] * 3] * 4), "b": np.ones((4, 3))}, "numeric"),
    ],
)
def test_load_calib_rejects_bad_contents(
    tmp_path: Path, calib_model: onnx.ModelProto, arrays: dict[str, Any], message: str
) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, **arrays)
    with pytest.raises(QmpassInputError, match=message):
        load_calib(path, calib_model)


def test_load_calib_rejects_unreadable_files(tmp_path: Path, calib_model: onnx.ModelProto
                                             ) -> None:
    text = tmp_path / "inputs.txt"
    text.write_text("a,b\n1,2\n")
    with pytest.raises(QmpassInputError, match=r"not a readable \.npz"):
        load_calib(text, calib_model)

    good = tmp_path / "good.npz"
    np.savez(good, a=np.ones((400, 3)), b=np.ones((400, 3)))
    data = good.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(QmpassInputError, match="npz"):
        load_calib(cut, calib_model)
    torn = tmp_path / "torn.npz"  # the zip directory survives, a member's data does not
    torn.write_bytes(data[:100] + bytes(200) + data[300:])
    with pytest.raises(QmpassInputError, match="damaged or truncated"):
        load_calib(torn, calib_model)

    single = tmp_path / "single.npy"
    np.save(single, np.ones((4, 3)))
    with pytest.raises(QmpassInputError, match="single array"):
        load_calib(single, calib_model)
    with pytest.raises(QmpassInputError, match="no such"):
        load_calib(tmp_path / "missing.npz", calib_model)


def test_load_calib_rejects_fractional_values_for_integer_inputs(tmp_path: Path) -> None:
    model = make_model(
        [helper.make_node("Cast", ["ids"], ["y"], to=TensorProto.FLOAT)],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])],
        [tensor("y", ["batch"])],
    )
    path = tmp_path / "ids.npz"
    np.savez(path, ids=np.array([0.0, 1.5]))
    with pytest.raises(QmpassInputError, match="fractional"):
        load_calib(path, model)
    np.savez(path, ids=np.array([0.0, 2.0]))
    assert load_calib(path, model)["ids"].dtype == np.int64
