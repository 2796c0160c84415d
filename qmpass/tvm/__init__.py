"""qmpass for TVM build scripts: the same Plan as a Relax module pass.

* :func:`extract_relax`: a Relax function -> the :class:`~qmpass.extract.Operator`
  records of the ONNX path (matmuls, conv2d, their bias adds and batch norms);
* :func:`plan_onnx`: the ONNX path's plan, with its factor tensors (what
  ``qmpass.compress`` plans), and :meth:`OnnxPlan.compressed` its ONNX model;
* :class:`QMPass`: the ``tvm.transform`` module pass that applies a plan (or plans one
  on the module, data-free) to a Relax function: low-rank matmuls and convs, fused
  shared-basis matmuls, and channel pruning (:mod:`qmpass.tvm.prune`).

Importing :mod:`qmpass` does not import TVM; importing this package does.
"""

from qmpass.tvm.extract import RelaxExtraction, Site, extract_relax
from qmpass.tvm.pass_ import QMPass, RelaxOutcome, match_operators
from qmpass.tvm.plans import OnnxPlan, plan_onnx, plan_relax

__all__ = [
    "OnnxPlan",
    "QMPass",
    "RelaxExtraction",
    "RelaxOutcome",
    "Site",
    "extract_relax",
    "match_operators",
    "plan_onnx",
    "plan_relax",
]
