"""Plans for the Relax pass: the ONNX path's plan with its tensors, or one made on Relax.

"The same Plan" means the same decisions *and* the same new weights. The planner
(:func:`qmpass.plan.planner.make_plan`) returns both; :func:`plan_onnx` runs it exactly
as :func:`qmpass.compress` does (same named model, extraction, channel groups,
calibration statistics measured by onnxruntime through :mod:`qmpass.verify`), and
:meth:`OnnxPlan.compressed` builds the ONNX model of any subset of its steps with the
ONNX rewriters. The Relax pass applies the same steps with the same tensors, so the two
models compute the same function up to float32 rounding.

:func:`plan_relax` plans on the operators extracted from a Relax function instead
(data-free: the planner's statistics come from onnxruntime, which a Relax module alone
does not have); its steps name the Relax operators.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import onnx

from qmpass.compress import CompressConfig, calibration_stats
from qmpass.compress.calibration import split_feeds
from qmpass.extdata import embedded
from qmpass.extract import Extraction, extract_operators
from qmpass.extract.channels import ChannelGroup, channel_groups
from qmpass.modelio import ModelLike, load_model, stored_values
from qmpass.plan.planner import Method, PlanConfig, Planned, make_plan
from qmpass.rewrite import Applier
from qmpass.rewrite.base import working_form
from qmpass.rewrite.gated_lowrank import refuse_gated
from qmpass.tvm.extract import RelaxExtraction
from qmpass.verify import check_feeds

__all__ = ["OnnxPlan", "plan_onnx", "plan_relax"]


@dataclass(frozen=True)
class OnnxPlan:
    """A plan made on an ONNX model, with what it was made from.

    ``model`` is the input model with its nodes named (:func:`name_nodes`), so the
    plan's operator names find their nodes; ``extraction`` and ``groups`` its operators
    and channel groups; ``planned`` the plan and the new weights of every step.
    """

    model: onnx.ModelProto
    extraction: Extraction
    groups: tuple[ChannelGroup, ...]
    planned: Planned

    def compressed(
        self, steps: Sequence[int] | None = None
    ) -> tuple[onnx.ModelProto, dict[int, str]]:
        """The ONNX model with the steps at positions ``steps`` (all by default), and the
        positions (in ``steps``) the ONNX rewriters declined, with why."""
        chosen = range(len(self.planned.plan.steps)) if steps is None else steps
        pairs = [(self.planned.plan.steps[i], self.planned.tensors[i]) for i in chosen]
        applier = Applier(self.model, self.extraction, self.groups)
        return applier.build(pairs)


def plan_onnx(
    model: ModelLike,
    config: CompressConfig | None = None,
    convs: Literal["prune", "factorise"] = "prune",
) -> OnnxPlan:
    """Plan ``model`` as :func:`qmpass.compress` plans it with ``config`` (default
    ``CompressConfig()``) for one treatment of convolutions, ``convs``, without
    rewriting or verifying. With ``config.calib`` the plan is data-aware (whitened
    factors, bias corrections and, for ``convs="prune"``, channel pruning). It proposes
    no cross-layer shared basis, which the Relax pass does not print."""
    config = config if config is not None else CompressConfig()
    loaded = load_model(model)
    refuse_gated(loaded.proto, "the Relax pass")
    # the plan is rewritten later, outside any data folder: external data read in here
    whole = embedded(loaded.proto, loaded.folder)
    named = working_form(whole, owned=loaded.owned or whole is not loaded.proto)
    extraction = extract_operators(named, loaded.external)
    groups = channel_groups(named)
    stats = None
    if config.calib is not None:
        split = split_feeds(named, check_feeds(config.calib, named), config.holdout,
                            config.seed)  # fitted on the part compress fits on
        stats = calibration_stats(named, extraction, groups, config.method, split.fit)
    # without cross-layer bases, which the Relax pass does not print (it would decline them)
    planned = make_plan(extraction, groups, stored_values(named), stats,
                        replace(config.plan_config(convs), crosslayer=False),
                        named.graph.name or "model")
    return OnnxPlan(named, extraction, tuple(groups), planned)


def plan_relax(
    extraction: RelaxExtraction,
    *,
    keep: float | None = None,
    delta: float | None = None,
    method: Method = "qmfrg",
    align: int = 8,
) -> Planned:
    """A data-free plan of ``method`` for the operators of a Relax function (the
    default budget is ``delta = 0.05``, as for ``qmpass compress``). Channel pruning
    needs the ONNX channel analysis and is not planned here."""
    if method in ("magnitude", "random"):
        raise ValueError(f"method '{method}' prunes channels; plan it with plan_onnx")
    if keep is None and delta is None:
        delta = 0.05
    config = PlanConfig(method, keep=keep, delta=delta, align=align)
    values: dict[str, np.ndarray] = {}
    return make_plan(extraction.extraction(), (), values, None, config, extraction.function)
