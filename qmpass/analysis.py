"""``analyze``: model -> operators -> spectral states -> QM-FRG -> clusters (read-only)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import networkx as nx
import numpy as np
from tqdm import tqdm

from qmpass.algebra import factored_linear_declines
from qmpass.errors import QmpassInputError
from qmpass.extdata import data_folder
from qmpass.extract import Extraction, Operator, extract_operators
from qmpass.frg import FRGConfig, build_qmfrg, clusters, graph_to_json
from qmpass.frg.crosslayer import CrossLayerMerge, crosslayer_graph, crosslayer_merges
from qmpass.modelio import LoadedModel, ModelLike, load_model
from qmpass.parallel import Executor, check_parallel, model_file
from qmpass.scratch import Scratch
from qmpass.spectral import (
    SV_METHODS,
    SpectralState,
    SVMethod,
    frobenius_norm,
    spectral_state,
)

__all__ = ["Analysis", "AnalysisConfig", "analyze"]

#: relative-entropy bounds reported per operator (the rank each allows)
REPORTED_DELTAS = (0.01, 0.05, 0.1)


@dataclass(frozen=True)
class AnalysisConfig:
    """Knobs of :func:`analyze`. ``sv_method`` picks Gram eigenvalues (fast, see
    ``qmpass.spectral.state``) or LAPACK singular values; ``cluster_method`` splits the
    graph by connected components or by spectral clustering; ``progress`` shows a bar on
    stderr when it is a terminal (None), always (True) or never (False). Invalid values
    raise :class:`~qmpass.errors.QmpassInputError` (``frg`` checks its own).

    ``jobs``: threads computing the operators' spectra; ``scheduler``: the address of a
    Dask scheduler (``tcp://host:port``) to compute them on instead, its workers reading
    the weights from the model file (:mod:`qmpass.parallel`). The states are the same
    either way."""

    frg: FRGConfig = field(default_factory=FRGConfig)
    sv_method: SVMethod = "gram"
    cluster_method: Literal["components", "spectral"] = "components"
    progress: bool | None = None
    jobs: int = 1
    scheduler: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.frg, FRGConfig):
            raise QmpassInputError(
                f"frg must be an FRGConfig, got {type(self.frg).__name__}."
            )
        if self.sv_method not in SV_METHODS:
            raise QmpassInputError(
                f"unknown singular-value method '{self.sv_method}'; choose "
                f"{' or '.join(SV_METHODS)}."
            )
        if self.cluster_method not in ("components", "spectral"):
            raise QmpassInputError(
                f"unknown cluster method '{self.cluster_method}'; choose components or "
                "spectral."
            )
        if self.progress not in (None, True, False):
            raise QmpassInputError(
                f"progress must be None, True or False, got {self.progress!r}."
            )
        check_parallel(self.jobs, self.scheduler)


@dataclass(frozen=True)
class Analysis:
    """What qmpass knows about a model before it changes anything.

    ``clusters`` group operators whose input-side density matrices are close (Bures
    angle under the graph threshold): candidates for a shared basis. ``spectral_clusters``
    group by spectra alone (FS distance), which says nothing about function.
    """

    model_name: str
    extraction: Extraction
    states: tuple[SpectralState, ...]
    graph: nx.Graph
    clusters: tuple[tuple[str, ...], ...]
    seconds: dict[str, float]
    spectral_clusters: tuple[tuple[str, ...], ...] = ()
    #: groups of units reading different tensors proposed to share one input-side basis
    #: (:mod:`qmpass.frg.crosslayer`); ``compress`` measures each and keeps the winners
    crosslayer: tuple[CrossLayerMerge, ...] = ()
    #: the scratch file the model's weights were moved to at load, if they were
    #: (:func:`~qmpass.modelio.spill_embedded`): the operators read them from it
    spilled: Scratch | None = field(default=None, repr=False, compare=False)

    @property
    def operators(self) -> tuple[Operator, ...]:
        return self.extraction.operators

    def to_dict(self) -> dict[str, Any]:
        """The JSON report (see README, "analyze report")."""
        ex = self.extraction
        return {
            "model": self.model_name,
            "ir_version": ex.ir_version,
            "opset": ex.opset,
            "operators": [
                _operator_dict(op, st) for op, st in zip(ex.operators, self.states, strict=True)
            ],
            "skipped": [vars(s) for s in ex.skipped],
            "unsupported": [vars(s) for s in ex.unsupported],
            "fusion_groups": [list(g) for g in ex.fusion_groups],
            "distances": _distance_summary(self.graph, len(self.states)),
            "clusters": [list(c) for c in self.clusters],
            "spectral_clusters": [list(c) for c in self.spectral_clusters],
            "crosslayer_candidates": [m.to_dict() for m in self.crosslayer],
            "graph": graph_to_json(self.graph),
            "totals": {
                "operators": len(ex.operators),
                "params": sum(op.params for op in ex.operators),
                "flops": sum(op.flops for op in ex.operators),
            },
            "seconds": self.seconds,
        }


def analyze(model: ModelLike, config: AnalysisConfig = AnalysisConfig()) -> Analysis:
    """Analyse ``model`` (a path or an ``onnx.ModelProto``, which is not modified)."""
    timer = time.perf_counter()
    loaded = load_model(model, spill=True)
    seconds: dict[str, float] = {"load": time.perf_counter() - timer}
    with data_folder(loaded.folder):  # external data: read a tensor at a time from there
        return _analyze(loaded, config, seconds)


def _analyze(loaded: LoadedModel, config: AnalysisConfig, seconds: dict[str, float]) -> Analysis:
    timer = time.perf_counter()
    extraction = extract_operators(loaded.proto, loaded.external)
    seconds["extract"] = time.perf_counter() - timer

    timer = time.perf_counter()
    ops = extraction.operators
    source = model_file(loaded)
    with Executor(config.jobs, config.scheduler) as executor:
        with tqdm(total=len(ops), desc="spectra", unit="op", disable=_quiet(config)) as bar:
            states = tuple(executor.map(_state, [(op, config.sv_method) for op in ops],
                                        source=source, on_done=bar.update))
        seconds["spectra"] = time.perf_counter() - timer

        timer = time.perf_counter()
        graph = build_qmfrg(extraction.operators, states, config.frg, executor=executor,
                            source=source)
        by_bures = tuple(clusters(graph, metric="bures", method=config.cluster_method))
        by_spectrum = tuple(clusters(graph, metric="fs", method=config.cluster_method))
        seconds["qmfrg"] = time.perf_counter() - timer
        timer = time.perf_counter()
        crosslayer = _crosslayer(extraction, states, graph, executor, source)
        seconds["crosslayer"] = time.perf_counter() - timer
    return Analysis(loaded.name, extraction, states, graph, by_bures, seconds, by_spectrum,
                    crosslayer, loaded.spilled)


def _crosslayer(extraction: Extraction, states: tuple[SpectralState, ...], qmfrg: nx.Graph,
                executor: Executor, source: Path | None) -> tuple[CrossLayerMerge, ...]:
    """The cross-layer shared-basis candidates: units (a fusion group, or one operator)
    of MatMul/Gemm operators a basis can serve, merged by the QM-FRG's Bures angles (the
    analysis's ``qmfrg`` and this graph share one Bures budget)."""
    fit = {op.name: st for op, st in zip(extraction.operators, states, strict=True)
           if factored_linear_declines(op) is None}
    units = [g for g in extraction.fusion_groups if all(n in fit for n in g)]
    grouped = {n for g in units for n in g}
    units += [(n,) for n in fit if n not in grouped]
    ops = {op.name: op for op in extraction.operators}
    names = [n for unit in units for n in unit]
    if len(units) < 2:
        return ()
    graph = crosslayer_graph([ops[n] for n in names], [fit[n] for n in names], known=qmfrg,
                             executor=executor, source=source)
    return tuple(crosslayer_merges(graph, units))


def _quiet(config: AnalysisConfig) -> bool | None:
    return None if config.progress is None else not config.progress


def _state(op: Operator, method: SVMethod) -> SpectralState:
    weight = op.stored_weight if method == "gram" else op.weight
    return spectral_state(op.name, weight, op.bias, method)


def _operator_dict(op: Operator, state: SpectralState) -> dict[str, Any]:
    full = state.singular_values.size
    ranks = sorted({1, *(2**k for k in range(1, int(np.log2(full)) + 1)), full})
    return {
        "name": op.name,
        "op_type": op.op_type,
        "graph": op.graph,
        "input": op.input,
        "output": op.output,
        "matrix_shape": list(op.shape),
        "weight": op.weight_name,
        "weight_source": op.weight_source,
        "bias_source": op.bias_source,
        "folded_batchnorm": op.folded_batchnorm,
        "weight_side": op.weight_side,
        "geometry": None if op.geometry is None else vars(op.geometry),
        "params": op.params,
        "flops": op.flops,
        "weight_norm": frobenius_norm(op.stored_weight),
        "bias_norm": 0.0 if op.bias is None else float(np.linalg.norm(op.bias)),
        "effective_rank": state.effective_rank,
        "energy_kept": {str(q): state.energy_kept(q) for q in ranks},
        "rank_for_delta": {str(d): state.rank_for_delta(d) for d in REPORTED_DELTAS},
        "psi": state.psi.tolist(),
        "notes": list(op.notes),
    }


def _distance_summary(graph: nx.Graph, n_ops: int) -> dict[str, Any]:
    fs = np.array([d["d_fs"] for _, _, d in graph.edges(data=True)])
    bures = np.array([d["d_bures"] for _, _, d in graph.edges(data=True) if "d_bures" in d])
    nearest = {}
    for node in graph.nodes:
        edges = graph.edges(node, data=True)
        if edges:
            _, other, data = min(edges, key=lambda e: e[2]["d_fs"])
            nearest[node] = {"operator": other, **{k: float(v) for k, v in data.items()}}

    def summary(values: np.ndarray) -> dict[str, float] | None:
        if values.size == 0:
            return None
        return {"min": float(values.min()), "median": float(np.median(values)),
                "max": float(values.max())}

    return {
        "threshold": graph.graph.get("threshold"),
        "max_neighbors": graph.graph.get("max_neighbors"),
        "pairs": n_ops * (n_ops - 1) // 2,
        "edges": graph.number_of_edges(),
        "edges_with_bures": int(bures.size),
        "bures_pairs_over_budget": graph.graph.get("bures_pairs_over_budget", 0),
        "fs_on_edges": summary(fs),
        "bures_on_edges": summary(bures),
        "nearest": nearest,
    }
