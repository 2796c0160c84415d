"""Rewrites: each applies one kind of :class:`~qmpass.plan.Step` to an ONNX graph."""
