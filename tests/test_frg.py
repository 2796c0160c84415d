"""The QM-FRG: the sparse graph equals the brute-force one, the filter is sound."""

from __future__ import annotations

import dataclasses

import networkx as nx
import numpy as np
import pytest
from conftest import fixture_path

import qmpass
from qmpass.frg import FRGConfig, build_qmfrg, clusters, graph_to_graphml, graph_to_json
from qmpass.spectral import augmented_matrix, bures_angle, fs_distance_matrix


@pytest.fixture(scope="module")
def analysis() -> qmpass.Analysis:
    return qmpass.analyze(fixture_path("transformer_digits"))


@pytest.mark.parametrize("threshold", [0.05, 0.15, 0.5])
def test_edges_are_exactly_the_pairs_under_the_threshold(analysis, threshold) -> None:
    ops, states = analysis.operators, analysis.states
    unlimited = FRGConfig(threshold=threshold, block_rows=3, bures_work=np.inf)
    graph = build_qmfrg(ops, states, unlimited)
    brute = fs_distance_matrix(states)
    expected = {
        frozenset((ops[i].name, ops[j].name))
        for i in range(len(ops)) for j in range(i + 1, len(ops)) if brute[i, j] <= threshold
    }
    assert {frozenset(e) for e in graph.edges} == expected
    for u, v, data in graph.edges(data=True):
        i, j = (next(k for k, o in enumerate(ops) if o.name == n) for n in (u, v))
        assert data["d_fs"] == pytest.approx(brute[i, j], abs=1e-7)
        if ops[i].shape[1] == ops[j].shape[1]:
            a = augmented_matrix(ops[i].weight, ops[i].bias)
            b = augmented_matrix(ops[j].weight, ops[j].bias)
            assert data["d_bures"] == pytest.approx(bures_angle(a, b))
            assert data["d_fs"] <= data["d_bures"] + 1e-7  # why the filter is sound
        else:
            assert "d_bures" not in data


def test_each_operator_keeps_its_closest_neighbours(analysis) -> None:
    ops, states = analysis.operators, analysis.states
    brute = fs_distance_matrix(states)
    np.fill_diagonal(brute, np.inf)
    graph = build_qmfrg(ops, states, FRGConfig(threshold=0.5, max_neighbors=1, block_rows=4))
    expected = {
        frozenset((ops[i].name, ops[int(np.argmin(brute[i]))].name))
        for i in range(len(ops)) if brute[i].min() <= 0.5
    }
    assert {frozenset(e) for e in graph.edges} == expected


def test_bures_work_is_capped_and_the_rest_counted(analysis) -> None:
    config = FRGConfig(threshold=0.5, bures_work=0.0, bures_min_flops=0.0)
    graph = build_qmfrg(analysis.operators, analysis.states, config)
    assert graph.graph["bures_pairs"] == 0
    same_width = [
        (u, v) for u, v in graph.edges
        if graph.nodes[u]["d_in"] == graph.nodes[v]["d_in"]
    ]
    assert graph.graph["bures_pairs_over_budget"] == len(same_width) > 0
    assert not any("d_bures" in d for _, _, d in graph.edges(data=True))


def test_a_second_graph_takes_over_the_first_ones_bures_angles_and_spent_work(analysis) -> None:
    """The analysis's cross-layer graph and its QM-FRG spend one Bures budget: angles the
    first graph computed are taken over (equal to computing them), and its spent work
    leaves the second graph only the rest."""
    from qmpass.frg.crosslayer import crosslayer_graph

    ops, states = analysis.operators, analysis.states
    first = build_qmfrg(ops, states, FRGConfig(threshold=0.5, bures_work=np.inf))
    assert first.graph["bures_pairs"] > 0 and first.graph["bures_flops"] > 0
    alone = crosslayer_graph(ops, states)
    taken = crosslayer_graph(ops, states, known=first)
    for u, v, data in first.edges(data=True):
        if "d_bures" in data:
            assert taken.edges[u, v]["d_bures"] == data["d_bures"]
            assert alone.edges[u, v]["d_bures"] == pytest.approx(data["d_bures"], abs=1e-9)
    # a first graph that spent all of the budget leaves the second only what it computed
    spent = first.copy()
    spent.graph["bures_flops"] = np.inf
    starved = crosslayer_graph(ops, states, known=spent)
    angles = {frozenset((u, v)) for u, v, d in starved.edges(data=True) if "d_bures" in d}
    assert angles == {frozenset((u, v)) for u, v, d in first.edges(data=True)
                      if "d_bures" in d and starved.has_edge(u, v)}
    assert starved.graph["bures_pairs_over_budget"] > 0


@pytest.mark.parametrize("work", [np.inf, 10.0])
def test_bures_angles_computed_in_parallel_are_the_serial_ones(analysis, work) -> None:
    """Split into tasks of consecutive pairs on two threads, the same angles to the last
    bit, the same pairs within the budget and the same counts (all pairs, then a budget
    that leaves some over it)."""
    from qmpass.parallel import Executor

    config = FRGConfig(threshold=0.5, bures_work=work, bures_min_flops=0.0)
    serial = build_qmfrg(analysis.operators, analysis.states, config)
    with Executor(jobs=2) as executor:
        threaded = build_qmfrg(analysis.operators, analysis.states, config, executor=executor)
    assert serial.graph == threaded.graph and serial.graph["bures_pairs"] > 16
    assert (serial.graph["bures_pairs_over_budget"] > 0) == (work < np.inf)
    assert nx.utils.edges_equal(serial.edges(data=True), threaded.edges(data=True))


def test_trained_layers_with_close_spectra_are_not_close_operators(analysis) -> None:
    """On the trained transformer, many pairs pass the spectral filter and none of them
    is confirmed by the Bures angle: spectra alone do not find redundancy."""
    graph = build_qmfrg(analysis.operators, analysis.states, FRGConfig(threshold=0.1))
    bures = [d["d_bures"] for _, _, d in graph.edges(data=True) if "d_bures" in d]
    assert len(bures) >= 5
    assert min(bures) > 0.3
    assert clusters(graph, metric="bures") == []
    assert clusters(graph, metric="fs")


def test_a_rotated_copy_is_clustered_with_its_original(analysis) -> None:
    op = analysis.operators[5]
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((op.shape[0], op.shape[0])))
    twin = dataclasses.replace(op, name="twin", weight=q @ op.weight,
                               bias=None if op.bias is None else q @ op.bias)
    ops = [*analysis.operators, twin]
    states = [*analysis.states, qmpass.spectral.spectral_state("twin", twin.weight, twin.bias)]
    graph = build_qmfrg(ops, states, FRGConfig(threshold=0.05))
    assert graph.edges[op.name, "twin"]["d_bures"] < 1e-6
    assert {op.name, "twin"} in [set(c) for c in clusters(graph, metric="bures")]


def test_spectral_clustering_splits_two_groups() -> None:
    graph = nx.Graph(threshold=1.0)
    for group in ("a", "b"):
        for i in range(4):
            for j in range(i + 1, 4):
                graph.add_edge(f"{group}{i}", f"{group}{j}", d_fs=0.01, d_bures=0.01)
    graph.add_edge("a0", "b0", d_fs=0.9, d_bures=0.9)
    found = clusters(graph, metric="bures", method="spectral")
    assert sorted(found) == [("a0", "a1", "a2", "a3"), ("b0", "b1", "b2", "b3")]
    assert clusters(graph, metric="bures") == [tuple(sorted(graph.nodes))]


def test_exports_round_trip(analysis, tmp_path) -> None:
    data = graph_to_json(analysis.graph)
    assert len(data["nodes"]) == len(analysis.operators)
    assert len(data["edges"]) == analysis.graph.number_of_edges()
    path = tmp_path / "g.graphml"
    path.write_text(graph_to_graphml(analysis.graph))
    back = nx.read_graphml(path)
    assert set(back.nodes) == set(analysis.graph.nodes)
    assert back.number_of_edges() == analysis.graph.number_of_edges()


@pytest.mark.parametrize("kwargs", [
    {"threshold": -3.0}, {"threshold": 2.0}, {"threshold": float("nan")},
    {"max_neighbors": 0}, {"max_neighbors": 1.5}, {"block_rows": 0},
    {"bures_work": -1.0}, {"bures_work": float("nan")}, {"bures_min_flops": -1.0},
])
def test_bad_configuration_raises_an_input_error(kwargs) -> None:
    """The library refuses what would build a wrong graph, not only the CLI."""
    with pytest.raises(qmpass.QmpassInputError, match=next(iter(kwargs))):
        FRGConfig(**kwargs)
    # the edges of the range and an uncapped Bures budget are fine
    FRGConfig(threshold=0.0, bures_work=np.inf, bures_min_flops=0.0, max_neighbors=1)
    FRGConfig(threshold=np.pi / 2, max_neighbors=np.int64(3))
