"""What :func:`~qmpass.compress.compress` is asked to do: :class:`CompressConfig`."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from hw_targets import TARGET_NAMES
from qmpass.errors import QmpassInputError
from qmpass.parallel import check_parallel
from qmpass.plan.planner import ALLOCATIONS, METHODS, Allocation, Method, PlanConfig
from qmpass.plan.resource import PARAMS, Resource

__all__ = ["DEFAULT_ALIGN", "DEFAULT_DELTA", "DEFAULT_TOLERANCE", "CompressConfig"]

DEFAULT_DELTA = 0.05  # the budget when neither keep nor delta nor tolerance is given
DEFAULT_TOLERANCE = 0.05  # the tolerance with --delta, or with no budget at all
DEFAULT_ALIGN = 8  # ranks and channel counts, unless a keep budget needs finer steps


@dataclass(frozen=True)
class CompressConfig:
    """Knobs of :func:`~qmpass.compress.compress` (the CLI flags of ``qmpass compress``).

    The budget, as :meth:`mode` resolves it:

    * ``keep`` alone: the plan meets ``keep`` and every step is kept; the report gives
      the error it cost (``budget`` mode).
    * ``tolerance`` alone: the smallest model whose held-out error is within it, by a
      search over ``keep`` and then rollbacks (``search`` mode).
    * ``keep`` and ``tolerance``: rollbacks keep the tolerance; how far the result stopped
      from ``keep`` is a note in the report (an error with ``strict_budget``).
    * ``delta`` (with ``tolerance``, default ``DEFAULT_TOLERANCE``), or nothing at all
      (``delta = DEFAULT_DELTA``, ``tolerance = DEFAULT_TOLERANCE``): each operator keeps
      what ``delta`` allows, rollbacks keep the tolerance.

    ``align``: ranks and kept channel counts are multiples of it; None (the default) is
    ``DEFAULT_ALIGN`` (onnxruntime's CPU kernels are much faster on multiples of 8),
    relaxed to 1 where that is what lets a ``keep`` budget be met (on small layers a
    step of 8 channels is a large part of the budget).

    ``method``: ``qmfrg`` (the default), ``svd`` (plain truncated SVD), ``whitened``
    (per-operator whitened truncation, SVD-LLM's per-layer optimum), ``asvd``
    (activation-aware SVD, Yuan et al. 2023: the input side scaled by the channels' root
    mean square to the power 0.5, :class:`~qmpass.plan.factors.ActivationScaled`), or the
    channel-pruning baselines ``magnitude`` and ``random``; ``whitened`` and ``asvd`` are
    plain ``svd`` without ``calib``. Ranks are allocated by the Lagrangian for every
    low-rank method (uniformly only for the pruning baselines).

    ``calib`` feeds (keyed by graph input name) make the plan data-aware. They are split,
    seeded by ``seed``: ``holdout`` of the samples verify (the tolerance applies to
    them), the rest fit. Without them ``samples`` inputs are synthesised, which verifies
    only that the rewritten model runs and keeps its shapes. ``convs``: with calibration
    data, ``qmfrg`` can prune the channel groups of convolutions or factorise the
    convolutions; ``auto`` plans both and keeps the better (see :mod:`qmpass.compress`).
    ``refit``: with calibration data, the low-rank steps' second factors and biases can be
    refitted in topological order on the inputs the compressed model really feeds them
    (:mod:`qmpass.plan.sequential`); ``auto`` verifies both and keeps the better on the
    held-out inputs, ``on`` always refits, ``off`` (the default) never does: a refit runs
    the model once per topological level of the plan, which is not yet linear in the
    model's size (AlexNet: minutes).

    ``allocation``: how a ``keep`` budget is shared among the units
    (:class:`~qmpass.plan.planner.PlanConfig`): ``lagrangian`` (``qmfrg``'s default) or
    ``uniform`` (the same fraction of every operator: the default of ``svd`` and
    ``whitened``, as in their papers). ``pricing``: with calibration data, ``qmfrg``'s
    Lagrangian prices each unit's predicted error by what the model's output feels of it,
    measured by one run of the model per unit (``output``;
    :mod:`qmpass.compress.sensitivity`), or takes the units' own errors as they are
    (``layer``); ``auto`` (the default) is ``output`` unless those runs are projected to
    take more than ``PROBE_SECONDS`` (then ``layer``, and the report says so).
    ``budgets`` (decreasing, each in ``(0, 1]``, like ``keep``): a budget-gated model
    with one level per budget, made by :func:`~qmpass.compress.gated.compress_gated`
    (docs/GATED.md); it takes the place of ``keep``, ``delta`` and ``tolerance``.

    ``jobs``: threads computing the low-rank candidates (eigendecompositions) side by
    side; ``scheduler``: a Dask scheduler's address (``tcp://host:port``) to compute them
    on instead, its workers reading the weights from the model file
    (:mod:`qmpass.parallel`). The plan and the model are the same either way.

    ``crosslayer``: with calibration data, ``qmfrg`` lets the QM-FRG's groups of
    operators that read different tensors share one input-side basis where that is
    measured to lose less than separate factorisations at equal parameters
    (:mod:`qmpass.plan.units.crosslayer`); False plans without it.
    """

    method: Method = "qmfrg"
    keep: float | None = None
    delta: float | None = None
    tolerance: float | None = None
    calib: Mapping[str, np.ndarray] | None = None
    samples: int = 64
    seed: int = 0
    align: int | None = None
    convs: Literal["auto", "prune", "factorise"] = "auto"
    target: str | None = None
    batch: int = 1
    holdout: float = 0.25
    strict_budget: bool = False
    refit: Literal["auto", "on", "off"] = "off"
    jobs: int = 1
    scheduler: str | None = None
    pricing: Literal["auto", "output", "layer"] = "auto"
    allocation: Allocation | None = None
    crosslayer: bool = True
    budgets: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        check_parallel(self.jobs, self.scheduler)
        if self.budgets is not None:
            _check_budgets(self)
        if self.batch < 1:
            raise QmpassInputError(f"--batch must be at least 1, got {self.batch}.")
        if self.target is not None and self.target not in TARGET_NAMES:
            raise QmpassInputError(
                f"unknown target '{self.target}'; choose one of {', '.join(TARGET_NAMES)}."
            )
        if self.method not in METHODS:
            raise QmpassInputError(
                f"unknown method '{self.method}'; choose one of {', '.join(METHODS)}."
            )
        if self.keep is not None and self.delta is not None:
            raise QmpassInputError("give --keep or --delta, not both.")
        if self.keep is not None and not 0.0 < self.keep <= 1.0:
            raise QmpassInputError(f"--keep must be in (0, 1], got {self.keep}.")
        if self.delta is not None and not self.delta >= 0.0:
            raise QmpassInputError(f"--delta must be non-negative, got {self.delta}.")
        if self.convs not in ("auto", "prune", "factorise"):
            raise QmpassInputError(
                f"unknown conv treatment '{self.convs}'; choose auto, prune or factorise."
            )
        if self.align is not None and self.align < 1:
            raise QmpassInputError(f"--align must be a positive integer, got {self.align}.")
        if self.tolerance is not None and not self.tolerance >= 0.0:
            raise QmpassInputError(f"--tolerance must be non-negative, got {self.tolerance}.")
        if self.refit not in ("auto", "on", "off"):
            raise QmpassInputError(f"--refit must be auto, on or off, got {self.refit!r}.")
        if not 0.0 < self.holdout < 1.0:
            raise QmpassInputError(f"--holdout must be in (0, 1), got {self.holdout}.")
        if self.allocation is not None and self.allocation not in ALLOCATIONS:
            raise QmpassInputError(f"--allocation must be {' or '.join(ALLOCATIONS)}, got "
                                   f"{self.allocation!r}.")
        if self.pricing not in ("auto", "output", "layer"):
            raise QmpassInputError(
                f"--pricing must be auto, output or layer, got {self.pricing!r}.")
        if self.strict_budget and (self.keep is None or self.tolerance is None):
            raise QmpassInputError("--strict-budget needs both --keep and --tolerance.")

    @property
    def mode(self) -> Literal["budget", "search", "rollback"]:
        """How the budget is met (see the class docstring)."""
        if self.keep is not None and self.tolerance is None:
            return "budget"
        if self.keep is None and self.delta is None and self.tolerance is not None:
            return "search"
        return "rollback"

    @property
    def effective_tolerance(self) -> float:
        """The held-out error rollbacks keep (infinite in ``budget`` mode)."""
        if self.mode == "budget":
            return math.inf
        return DEFAULT_TOLERANCE if self.tolerance is None else self.tolerance

    @property
    def priced_by_output(self) -> bool:
        """Whether a ``keep`` budget is allocated on measured output gains
        (:mod:`qmpass.compress.sensitivity`): ``qmfrg`` with calibration data."""
        return self.pricing != "layer" and self.method == "qmfrg" and self.calib is not None

    def conv_choices(self) -> tuple[Literal["prune", "factorise"], ...]:
        """The treatments of convolutions to plan (both only where they can differ)."""
        if self.convs != "auto":
            return (self.convs,)
        if self.method == "qmfrg" and self.calib is not None:
            return ("prune", "factorise")
        return ("prune",)

    def plan_config(
        self, convs: Literal["prune", "factorise"] = "prune", resource: Resource = PARAMS,
        keep: float | None = None, align: int | None = None,
    ) -> PlanConfig:
        """The planner's configuration; ``keep`` overrides the budget (the search),
        ``align`` the alignment (its relaxation)."""
        keep = self.keep if keep is None else keep
        delta = DEFAULT_DELTA if keep is None and self.delta is None else self.delta
        align = align or self.align or DEFAULT_ALIGN
        return PlanConfig(
            self.method, keep=keep, delta=None if keep is not None else delta,
            seed=self.seed, align=align, convs=convs, resource=resource,
            allocation=self.allocation,
            crosslayer=self.crosslayer,
        )


def _check_budgets(config: CompressConfig) -> None:
    """A gated model's budgets: one clear sentence for each way they can be wrong."""
    try:
        budgets = tuple(float(b) for b in config.budgets or ())
    except (TypeError, ValueError) as exc:
        raise QmpassInputError(f"--budgets must be numbers, got {config.budgets!r}.") from exc
    object.__setattr__(config, "budgets", budgets)  # frozen: normalised once, here
    if not budgets:
        raise QmpassInputError("--budgets needs at least one budget.")
    shown = ",".join(f"{b:g}" for b in budgets)
    if any(not 0.0 < b <= 1.0 for b in budgets):
        raise QmpassInputError(f"--budgets must each be in (0, 1], got {shown}.")
    if len(set(budgets)) != len(budgets):
        raise QmpassInputError(f"--budgets must not repeat a budget, got {shown}.")
    if any(b >= a for a, b in itertools.pairwise(budgets)):
        raise QmpassInputError(
            f"--budgets must decrease (level 0 is the largest budget), got {shown}.")
    if config.keep is not None or config.delta is not None or config.tolerance is not None:
        raise QmpassInputError("--budgets cannot be combined with --keep, --delta or "
                               "--tolerance: each level's budget is its keep.")
    if config.method in ("magnitude", "random"):
        raise QmpassInputError(f"--budgets gates low-rank factors; --method {config.method} "
                               "only prunes channels.")
    if config.refit != "off":
        raise QmpassInputError("--budgets does not refit: refitted second factors differ "
                               "per rank, so one stored pair could not serve every level.")
