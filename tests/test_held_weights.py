"""Weights held in their stored form (:class:`qmpass.extdata.HeldArray`): the float64
arrays extraction used to hold, made when used, once while in use, never deadlocking."""

from __future__ import annotations

import threading

import numpy as np
import onnx
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
