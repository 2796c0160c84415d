"""qmpass: a compression compiler pass for inference graphs.

The public API is small on purpose: :func:`analyze` and the records it returns, plus the
one exception users catch. Everything else lives in subpackages named after the stage of
the data flow (``extract`` -> ``spectral`` -> ``frg``).
"""

from qmpass.analysis import Analysis, AnalysisConfig, analyze
from qmpass.errors import QmpassInputError

__all__ = ["Analysis", "AnalysisConfig", "QmpassInputError", "analyze"]
__version__ = "0.1.0"
