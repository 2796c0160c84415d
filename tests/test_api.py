"""The public API stays small, and analysis is a pure function of the model."""

from __future__ import annotations

import onnx
import pytest
from conftest import fixture_path

import qmpass
from qmpass.frg import FRGConfig


def test_public_api_is_small() -> None:
    assert sorted(qmpass.__all__) == [
        "Analysis", "AnalysisConfig", "CompressConfig", "QmpassInputError", "Report", "analyze",
        "compress",
    ]


def test_analyze_accepts_a_path_or_a_proto_and_gives_the_same_answer() -> None:
    path = fixture_path("mlp_digits")
    by_path = qmpass.analyze(path).to_dict()
    by_proto = qmpass.analyze(onnx.load(str(path))).to_dict()
    for key in ("operators", "distances", "clusters", "totals"):
        assert by_path[key] == by_proto[key]


def test_every_fixture_is_analysed_end_to_end(fixture_names) -> None:
    expected = {"mlp_digits": 3, "resnet_digits": 9, "resnet_digits_bn": 9,
                "transformer_digits": 14}
    for name in fixture_names:
        analysis = qmpass.analyze(fixture_path(name))
        assert len(analysis.operators) == expected[name]
        assert not analysis.extraction.unsupported
        assert all(op.flops > 0 and op.params > 0 for op in analysis.operators)


def test_analysis_configuration_is_checked_by_the_library() -> None:
    for kwargs in ({"sv_method": "lapack"}, {"cluster_method": "kmeans"}, {"progress": "yes"},
                   {"frg": {"threshold": 0.1}}):
        with pytest.raises(qmpass.QmpassInputError):
            qmpass.AnalysisConfig(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(qmpass.QmpassInputError, match="threshold"):
        qmpass.AnalysisConfig(frg=FRGConfig(threshold=-3))
    assert qmpass.AnalysisConfig(sv_method="svd", cluster_method="spectral").sv_method == "svd"
