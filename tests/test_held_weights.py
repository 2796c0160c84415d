"""Weights held in their stored form (:class:`qmpass.extdata.HeldArray`): the float64
arrays extraction used to hold, made when used, once while in use, never deadlocking."""

from __future__ import annotations

import threading

import numpy as np
import onnx
import pytest
from conftest import fixture_path

from qmpass import extdata
from qmpass.extdata import HeldArray
from qmpass.extract import extract_operators


def test_operators_hold_their_weights_unconverted_and_load_them_as_before() -> None:
    model = onnx.load(str(fixture_path("transformer_digits")))
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    ops = [op for op in extract_operators(model).operators if op.op_type == "MatMul"]
    assert ops
    for op in ops:
        held = op.__dict__["_weight"]
        assert isinstance(held, HeldArray)
        assert held.shape == op.shape
        weight = op.weight
        assert weight.dtype == np.float64 and weight.flags.c_contiguous
        assert not weight.flags.writeable
        np.testing.assert_array_equal(weight, stored[op.weight_name].astype(np.float64).T)
        assert op.weight is weight  # in use: the same array, not a second conversion


def test_a_held_weight_collected_while_the_cache_is_locked_does_not_deadlock() -> None:
    """The garbage collector may finalise a HeldArray inside ``load`` (the cache's lock
    held); its finalizer must not wait for that lock."""
    held = HeldArray(np.ones((4, 3), np.float32), transpose=True, scale=2.0)
    assert held.load().shape == (3, 4)
    done = threading.Event()

    def collect_under_the_lock() -> None:
        nonlocal held
        with extdata._CACHE_LOCK:
            del held  # the finalizer runs here
        done.set()

    worker = threading.Thread(target=collect_under_the_lock, daemon=True)
    worker.start()
    assert done.wait(10), "the finalizer waited for the cache's lock"
    again = HeldArray(np.zeros((2, 2), np.float32), transpose=False, scale=1.0)
    assert again.load().sum() == 0  # the forgotten key is dropped at the next load
    assert not extdata._FORGOTTEN


def test_stored_weights_are_views_and_planning_from_them_equals_float64() -> None:
    """``Operator.stored_weight`` is the float32 matrix itself (not converted), and the
    projections, factors and certificates the planner makes from it a block at a time
    equal those from the float64 weight."""
    from qmpass.plan.factors import projection
    from qmpass.spectral import lower_gram, operator_norm

    model = onnx.load(str(fixture_path("transformer_digits")))
    for op in (op for op in extract_operators(model).operators if op.op_type == "MatMul"):
        stored = op.stored_weight
        assert stored.dtype == np.float32 and not stored.flags.writeable
        np.testing.assert_array_equal(stored, op.weight)
        exact = projection([op.weight], None)
        blocked = projection([stored], None)
        np.testing.assert_allclose(blocked.energy, exact.energy, rtol=1e-9, atol=1e-12)
        for got, want in zip(blocked.factors(4), exact.factors(4), strict=True):
            assert got.dtype == np.float64
            np.testing.assert_allclose(got @ got.T, want @ want.T, rtol=1e-8, atol=1e-10)
        second, first = exact.factors(4)[1], exact.factors(4)[0]
        assert operator_norm(stored, (second, first)) == \
            operator_norm(op.weight - second @ first)
    # the Gram on the smaller side, lower triangle, for wide and tall float32 matrices
    rng = np.random.default_rng(0)
    for shape in [(30, 70), (70, 30)]:
        m = rng.standard_normal(shape).astype(np.float32)
        wide = m.astype(np.float64)
        expected = wide @ wide.T if shape[0] <= shape[1] else wide.T @ wide
        np.testing.assert_allclose(lower_gram(m), np.tril(expected), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("shape", [(30, 70), (70, 30), (40, 40)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_augmented_gram_of_a_stored_weight_equals_the_augmented_matrix(
        shape, with_bias, monkeypatch) -> None:
    """The spectra's Gram of ``W^ = [[W, b], [0, 1]]``, summed over blocks of a float16
    ``W`` (three columns or rows a block here), is the float64 ``W^``'s, and the singular
    values and Frobenius norm from it are LAPACK's."""
    import scipy.linalg

    from qmpass.spectral import (
        augmented_lower_gram,
        augmented_matrix,
        augmented_singular_values,
        frobenius_norm,
        gram,
    )

    monkeypatch.setattr(gram, "_BLOCK_VALUES", 3 * max(shape))
    rng = np.random.default_rng(1)
    w = rng.standard_normal(shape).astype(np.float16)
    bias = rng.standard_normal(shape[0]) if with_bias else None
    full = augmented_matrix(w.astype(np.float64), bias)
    expected = full @ full.T if shape[0] <= shape[1] else full.T @ full
    np.testing.assert_allclose(augmented_lower_gram(w, bias), np.tril(expected),
                               rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(augmented_singular_values(w, bias),
                               scipy.linalg.svdvals(full), rtol=1e-9, atol=1e-9)
    assert frobenius_norm(w) == pytest.approx(np.linalg.norm(w.astype(np.float64)), rel=1e-12)


def test_a_weight_gives_the_same_gram_and_norm_in_any_layout_and_type() -> None:
    """A stored weight is a transposed float32 memory map or its held float64
    conversion, depending on what was used last: both give the same spectra's Gram and
    the same Frobenius norm to the last bit (the Dask run's report is the serial one's)."""
    from qmpass.spectral import augmented_lower_gram, frobenius_norm

    rng = np.random.default_rng(2)
    stored = np.asfortranarray(rng.standard_normal((256, 2048)).astype(np.float32))
    layouts = [stored, np.ascontiguousarray(stored), stored.astype(np.float64),
               np.ascontiguousarray(stored, dtype=np.float64)]
    assert len({frobenius_norm(w) for w in layouts}) == 1
    assert len({augmented_lower_gram(w, None).tobytes() for w in layouts}) == 1


def test_a_scaled_weight_has_no_stored_view() -> None:
    held = HeldArray(np.ones((4, 3), np.float32), transpose=True, scale=2.0)
    assert held.stored_view() is None
    plain = HeldArray(np.arange(12, dtype=np.float32).reshape(4, 3), transpose=True,
                      scale=1.0)
    view = plain.stored_view()
    assert view is not None and view.dtype == np.float32 and view.shape == (3, 4)
    integer = HeldArray(np.ones((4, 3), np.int8), transpose=False, scale=1.0)
    assert integer.stored_view() is None
