"""Verification: run original and rewritten models in onnxruntime and compare."""

from qmpass.verify.runner import run_model, session

__all__ = ["run_model", "session"]
