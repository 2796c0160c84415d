"""Extraction: ONNX graph -> :class:`Operator` records (read-only)."""

from qmpass.extract.extract import Extraction, extract_operators
from qmpass.extract.operator import ConvGeometry, Operator, Skipped

__all__ = ["ConvGeometry", "Extraction", "Operator", "Skipped", "extract_operators"]
