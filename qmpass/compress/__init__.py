"""``compress``: analyse -> plan -> rewrite -> verify, keeping only verified rewrites.

* :mod:`~qmpass.compress.config`: :class:`CompressConfig`, and how the budget is met
  (``--keep`` alone is met; ``--tolerance`` alone searches for the smallest model
  within it; both: rollbacks keep the tolerance and the report says how far from the
  budget it stopped);
* :mod:`~qmpass.compress.calibration`: the seeded split of the calibration inputs into
  the part that fits (the statistics) and the part that verifies, and the statistics;
* :mod:`~qmpass.compress.pipeline`: :func:`compress` itself, and the budget search;
* :mod:`~qmpass.compress.rollback`: keeping only what verification accepts;
* :mod:`~qmpass.compress.report`: :class:`Report` and its rows;
* :mod:`~qmpass.compress.gated`: :func:`compress_gated`, one budget-gated model for
  several budgets (``--budgets``), and its :class:`GatedReport`
  (:mod:`~qmpass.compress.gated_report`).


Every planned step is applied to a fresh import of the model, so rolling a step back is
just building the model without it. All steps are tried together first. When the result
breaks ``tolerance``, a search keeps a passing prefix of the plan's units (an operator,
a cluster, a channel group), least predicted error first, and the units past it are
added one at a time; a unit that breaks the tolerance falls back to milder variants of
itself (a higher rank, more channels) and is rolled back if none passes, with the
measured error as the reason (:mod:`~qmpass.compress.rollback`).

With calibration data, ``qmfrg`` can treat convolutions two ways (prune their channel
groups, or factorise them); both plans are built and verified. If both pass, the one with
the smaller error is kept; if the tolerance forces rollbacks, the one that ends with the
smaller model (``CompressConfig.convs``).
"""

from qmpass.compress.calibration import CALIBRATION_VECTORS, calibration_stats
from qmpass.compress.config import CompressConfig
from qmpass.compress.gated import compress_gated
from qmpass.compress.gated_report import GatedReport, LevelRow
from qmpass.compress.pipeline import compress
from qmpass.compress.report import Attempt, Outcome, Report

__all__ = [
    "CALIBRATION_VECTORS",
    "Attempt",
    "CompressConfig",
    "GatedReport",
    "LevelRow",
    "Outcome",
    "Report",
    "calibration_stats",
    "compress",
    "compress_gated",
]
