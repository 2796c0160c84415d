"""Rewrites: each applies one kind of :class:`~qmpass.plan.Step` to an ONNX graph;
:class:`Applier` applies a list of steps to a model."""

from qmpass.rewrite.apply import Applier

__all__ = ["Applier"]
