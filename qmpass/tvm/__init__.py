"""qmpass for TVM build scripts: the same Plan as a Relax module pass.

* :func:`extract_relax`: a Relax function -> the :class:`~qmpass.extract.Operator`
  records of the ONNX path (matmuls, conv2d, their bias adds and batch norms);
* :func:`plan_onnx`: the ONNX path's plan, with its factor tensors (what
  ``qmpass.compress`` plans), and :meth:`OnnxPlan.compressed` its ONNX model;
* :class:`QMPass`: the ``tvm.transform`` module pass that applies a plan (or plans one
  on the module, data-free) to a Relax function: low-rank matmuls and convs, fused
  shared-basis matmuls, and channel pruning (:mod:`qmpass.tvm.prune`);
  :meth:`QMPass.apply` returns a :class:`RelaxResult` (the module and what happened to
  each step).

Importing :mod:`qmpass` does not import TVM; importing this package does.
"""

from qmpass.tvm.extract import RelaxExtraction, Site, extract_relax
from qmpass.tvm.plans import OnnxPlan, plan_onnx, plan_relax
from qmpass.tvm.relax_pass import QMPass, RelaxOutcome, RelaxResult, match_operators

__all__ = [
    "OnnxPlan",
    "QMPass",
    "RelaxExtraction",
    "RelaxOutcome",
    "RelaxResult",
    "Site",
    "extract_relax",
    "match_operators",
    "plan_onnx",
    "plan_relax",
]
