"""The certificates in the report hold: every output vector of a rewritten operator moves
by no more than ``R ||W - W'||_op + ||b - b'||`` on the calibration inputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import fixture_path
from onnx import TensorProto, helper

import models
from qmpass.compress import calibration_stats
from qmpass.extract import extract_operators
from qmpass.extract.channels import channel_groups
from qmpass.modelio import stored_values
from qmpass.plan.planner import PlanConfig, make_plan
from qmpass.rewrite import Applier
from qmpass.rewrite.base import name_nodes
from qmpass.verify import load_calib, run_model


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    for name in names:
        tapped.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return tapped


@pytest.mark.parametrize(("name", "config"), [
    ("transformer_digits", PlanConfig("qmfrg", keep=0.4)),
    ("resnet_digits", PlanConfig("qmfrg", keep=0.6, convs="prune")),
    ("resnet_digits", PlanConfig("whitened", keep=0.6)),
])
def test_each_step_alone_moves_its_outputs_within_the_bound(name: str, config: PlanConfig
                                                            ) -> None:
    model = name_nodes(onnx.load(str(fixture_path(name))))
    calib = load_calib(models.MODELS_DIR / f"{name}_calib.npz", model)
    extraction = extract_operators(model)
    groups = channel_groups(model)
    ops = {op.name: op for op in extraction.operators}
    stats = calibration_stats(model, extraction, groups, config.method, calib)
    planned = make_plan(extraction, groups, stored_values(model), stats, config)
    applier = Applier(model, extraction, groups)
    ratios: list[float] = []
    for step, arrays in zip(planned.plan.steps, planned.tensors, strict=True):
        assert "bound" in step.certificate, step
        if step.kind == "prune_channels":
            group = next(g for g in groups if g.name == step.group)
            outputs = [next(n for n in model.graph.node if n.name == c.node).output[0]
                       for c in group.consumers]
            axis = group.channel_axis
        else:
            outputs = [ops[n].output for n in step.operators]
            axis = -1
        rewritten, declined = applier.build([(step, arrays)])
        assert not declined
        before = run_model(_with_outputs(model, outputs), calib)[-len(outputs):]
        after = run_model(_with_outputs(rewritten, outputs), calib)[-len(outputs):]
        for old, new in zip(before, after, strict=True):
            moved = np.linalg.norm(np.moveaxis(new - old, axis, -1), axis=-1).max()
            scale = np.linalg.norm(np.moveaxis(old, axis, -1), axis=-1).max()
            assert moved <= step.certificate["bound"] + 1e-5 * scale, (step.operators, moved)
            ratios.append(moved / step.certificate["bound"])
    assert len(ratios) >= 3
    assert max(ratios) > 0.05  # a bound, but not a vacuous one (0.05-0.3 of it is reached)
