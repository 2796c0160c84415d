"""Per-operator work on threads or a Dask cluster gives the serial run's results."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import numpy as np
import onnx
import pytest
from conftest import fixture_path

from qmpass import parallel
from qmpass.analysis import Analysis, AnalysisConfig, analyze
from qmpass.cli import main
from qmpass.compress import CompressConfig, compress
from qmpass.errors import QmpassInputError
from qmpass.extract import extract_operators
from qmpass.modelio import load_model
from qmpass.parallel import Executor, OperatorRef
from qmpass.verify import load_calib

MODEL = fixture_path("transformer_digits")


def _calib() -> dict[str, np.ndarray]:
    return dict(load_calib(MODEL.with_name(MODEL.stem + "_calib.npz"), load_model(MODEL).proto))


def _analysis(**kwargs: object) -> Analysis:
    return analyze(MODEL, AnalysisConfig(progress=False, **kwargs))  # type: ignore[arg-type]


def _compressed(**kwargs: object) -> tuple[bytes, object]:
    model, report = compress(MODEL, CompressConfig(keep=0.5, calib=_calib(), **kwargs))  # type: ignore[arg-type]
    return model.SerializeToString(), report.plan


def _same_states(a: Analysis, b: Analysis) -> None:
    assert [s.name for s in a.states] == [s.name for s in b.states]
    for x, y in zip(a.states, b.states, strict=True):
        assert np.array_equal(x.singular_values, y.singular_values)  # bitwise
    assert a.clusters == b.clusters
    assert a.graph.graph == b.graph.graph  # Bures pairs, work and pairs over budget
    assert sorted(a.graph.edges(data=True)) == sorted(b.graph.edges(data=True))  # bitwise


@pytest.fixture(scope="module")
def serial() -> tuple[Analysis, tuple[bytes, object]]:
    return _analysis(), _compressed()


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    distributed = pytest.importorskip("distributed")
    # processes: tasks and results really are pickled, and workers read the model file
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def test_threads_give_the_serial_states_and_plan(serial) -> None:
    analysis, (model, plan) = serial
    _same_states(analysis, _analysis(jobs=2))
    model2, plan2 = _compressed(jobs=2)
    assert plan2 == plan
    assert model2 == model


def test_a_dask_cluster_gives_the_serial_states_and_plan(serial, scheduler) -> None:
    analysis, (model, plan) = serial
    _same_states(analysis, _analysis(scheduler=scheduler))
    model2, plan2 = _compressed(scheduler=scheduler)
    assert plan2 == plan
    assert model2 == model


def test_an_in_memory_model_is_sent_to_the_cluster(serial, scheduler) -> None:
    analysis = analyze(onnx.load(str(MODEL)),
                       AnalysisConfig(progress=False, scheduler=scheduler))
    _same_states(serial[0], analysis)


def test_dask_tasks_name_operators_instead_of_carrying_weights() -> None:
    ops = extract_operators(load_model(MODEL).proto).operators
    named = parallel._named(list(ops[:3]), str(MODEL))
    assert all(isinstance(r, OperatorRef) for r in named)
    assert parallel._resolved(named)[0].name == ops[0].name
    assert np.array_equal(parallel._resolved(named)[1].weight, ops[1].weight)
    assert parallel._named(ops[0], None) is ops[0]  # in memory: sent as it is
    bad = OperatorRef(str(MODEL), ops[0].name, "0" * 32)
    with pytest.raises(RuntimeError, match="same model file"):
        parallel._resolved(bad)


def test_the_digest_is_the_same_in_any_layout_and_sees_a_changed_row() -> None:
    """A worker may hold a weight as its stored values, the client as a float64 copy:
    the digest (a sample of rows, the last one included) is the same; a changed last row
    is another model."""
    from dataclasses import replace

    op = max(extract_operators(load_model(MODEL).proto).operators, key=lambda o: o.shape[0])
    digest = parallel._digest(op)
    assert parallel._digest(replace(op, weight=np.asfortranarray(op.weight))) == digest
    changed = np.array(op.weight)
    changed[-1, 0] += 1.0
    assert parallel._digest(replace(op, weight=changed)) != digest


def test_the_executor_keeps_task_order() -> None:
    with Executor(jobs=2) as executor:
        assert executor.map(pow, [(2, k) for k in range(20)]) == [2**k for k in range(20)]


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def test_bad_jobs_and_an_unreachable_scheduler_are_input_errors(monkeypatch, capsys,
                                                               tmp_path) -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(QmpassInputError, match="--jobs"):
            AnalysisConfig(jobs=bad)  # type: ignore[arg-type]
        with pytest.raises(QmpassInputError, match="--jobs"):
            CompressConfig(jobs=bad)  # type: ignore[arg-type]
    with pytest.raises(QmpassInputError, match="--scheduler"):
        CompressConfig(scheduler="")
    monkeypatch.setattr(parallel, "CONNECT_TIMEOUT", 1.0)
    address = _closed_port()
    with pytest.raises(QmpassInputError, match="no Dask scheduler answered"):
        analyze(MODEL, AnalysisConfig(progress=False, scheduler=address))
    assert main(["analyze", str(MODEL), "--scheduler", address]) == 2
    assert main(["compress", str(MODEL), "-o", str(tmp_path / "out.onnx"), "--jobs", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("qmpass: no Dask scheduler answered at " + address)
    assert err[1].startswith("qmpass: --jobs must be a positive integer")
