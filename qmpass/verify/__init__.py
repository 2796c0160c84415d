"""Verification: the only part of qmpass that talks to onnxruntime.

* inputs: :func:`load_calib` (an .npz keyed by graph input names, checked; the same
  checks on arrays in memory: :func:`check_feeds`) and
  :func:`synthesize_inputs` (from the graph input types and shapes);
* running: :func:`session`, :func:`run_model`, :func:`run_batched`;
* comparison: :func:`compare` -> :class:`Verification`; :class:`Verifier` holds the
  original's outputs and checks candidates; :func:`accuracy` for classifiers;
* calibration statistics for data-aware planning: :func:`collect_stats` of
  :class:`StatsRequest` -> :class:`TensorStats`.
"""

from qmpass.verify.compare import Verification, Verifier, accuracy, compare
from qmpass.verify.inputs import check_feeds, load_calib, synthesize_inputs
from qmpass.verify.runner import DEFAULT_BATCH, run_batched, run_model, session
from qmpass.verify.stats import StatsRequest, TensorStats, collect_stats

__all__ = [
    "DEFAULT_BATCH",
    "StatsRequest",
    "TensorStats",
    "Verification",
    "Verifier",
    "accuracy",
    "check_feeds",
    "collect_stats",
    "compare",
    "load_calib",
    "run_batched",
    "run_model",
    "session",
    "synthesize_inputs",
]
