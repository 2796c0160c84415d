"""qmpass: a compression compiler pass for inference graphs.

The public API is small on purpose: :func:`analyze` and :func:`compress`, their
configuration and result records, and the one exception users catch. Everything else
lives in subpackages named after the stage of the data flow (``extract`` ->
``spectral`` -> ``frg`` -> ``plan`` -> ``rewrite`` -> ``verify``).
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
