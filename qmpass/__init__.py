"""qmpass: a compression compiler pass for inference graphs.

The public API is small on purpose: :func:`analyze` and :func:`compress`, their
configuration and result records, and the one exception users catch. Everything else
lives in subpackages named after the stages of the data flow. The commands run
different stages:

* ``analyze`` (:func:`analyze`): ``extract`` -> ``spectral`` (states, distances) ->
  ``frg`` (the QM-FRG and its clusters) -> ``report`` (HTML). Read-only.
* ``compress`` (:func:`compress`): ``extract`` (operators, channel groups) -> ``verify``
  (calibration statistics) -> ``plan`` -> ``rewrite`` -> ``verify`` (onnxruntime, with
  rollback). It never builds the QM-FRG and uses ``spectral`` only for
  ``operator_norm`` (the steps' certificates); its clusters are extraction's fusion
  groups (operators reading one tensor). With ``--target`` the budget is priced by
  ``hw_targets``' cost model.
* ``lower`` (:mod:`qmpass.lower`): ``extract`` -> ``hw_targets`` (kernels, simulation),
  checked against ``verify``'s onnxruntime runs. No planning, no rewriting.
* ``demo``: ``analyze`` then ``compress`` on the bundled model.

:mod:`qmpass.tvm` (TVM build scripts) plans with ``plan`` as ``compress`` does and applies
the plan to a Relax function.
"""

from qmpass.analysis import Analysis, AnalysisConfig, analyze
from qmpass.compress import CompressConfig, Report, compress
from qmpass.errors import QmpassInputError

__all__ = [
    "Analysis",
    "AnalysisConfig",
    "CompressConfig",
    "QmpassInputError",
    "Report",
    "analyze",
    "compress",
]
__version__ = "0.1.0"
