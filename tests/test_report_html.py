"""The HTML report: self-contained, one table row per operator, real PNG plots, escaped.

The page is read back with the standard library's HTML parser, so the checks see what a
browser would see (text unescaped, attributes split) rather than matching raw markup.
"""

from __future__ import annotations

import base64
import struct
import threading
from html.parser import HTMLParser

import matplotlib.pyplot as plt
import numpy as np
import onnx
import pytest
from conftest import const, fixture_path, make_model, tensor, trained_matrix
from onnx import helper

from qmpass import Analysis, AnalysisConfig, analyze
from qmpass.report import render_html
from qmpass.report.html import LABEL_WIDTH, TABLE_DELTA

FIXTURES = ["mlp_digits", "resnet_digits", "resnet_digits_bn", "transformer_digits"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUIET = AnalysisConfig(progress=False)
#: operators table columns, by header text
COLUMNS = ["#", "operator", "plot label", "op type", "matrix", "weight", "bias", "eff. rank",
           "energy at ¼ rank", f"rank for δ={TABLE_DELTA:g}", "params", "FLOPs"]


class Page(HTMLParser):
    """What the checks need from a page: images, every URL-bearing attribute, the rows of
    the operators table, the body text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.images: list[str] = []
        self.urls: list[str] = []
        self.tags: set[str] = set()
        self.header: list[str] = []
        self.rows: list[list[str]] = []
        self.text: list[str] = []
        self._in_table = False
        self._cell: list[str] | None = None
        self._in_head = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        values = dict(attrs)
        self.urls += [v or "" for k, v in attrs if k in ("src", "href")]
        if tag == "img":
            self.images.append(values.get("src") or "")
        if tag == "table" and values.get("id") == "operators":
            self._in_table = True
        if self._in_table:
            if tag == "thead":
                self._in_head = True
            elif tag == "tr" and not self._in_head:
                self.rows.append([])
            elif tag in ("td", "th"):
                self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if not self._in_table:
            return
        if tag in ("td", "th") and self._cell is not None:
            text = "".join(self._cell)
            (self.header if self._in_head else self.rows[-1]).append(text)
            self._cell = None
        elif tag == "thead":
            self._in_head = False
        elif tag == "table":
            self._in_table = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def column(self, name: str) -> list[str]:
        index = self.header.index(name)
        return [row[index] for row in self.rows]


def png_bytes(src: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    return base64.b64decode(src[len(prefix):], validate=True)


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which a valid PNG has first."""
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def analyses() -> dict[str, Analysis]:
    return {name: analyze(fixture_path(name), QUIET) for name in FIXTURES}


@pytest.fixture(scope="module")
def pages(analyses: dict[str, Analysis]) -> dict[str, str]:
    """Each fixture rendered once (rendering is the slow part of these tests)."""
    return {name: render_html(analysis) for name, analysis in analyses.items()}


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_page(analyses: dict[str, Analysis], pages: dict[str, str], name: str) -> None:
    analysis = analyses[name]
    page = Page(pages[name])

    # self-contained: every URL is inline data, nothing to fetch, nothing to run
    assert page.urls and all(url.startswith("data:") for url in page.urls)
    assert not page.tags & {"script", "link", "iframe", "object"}

    assert len(set(page.images)) == len(page.images) == 4  # spectra, energy, heatmap, graph
    for src in page.images:
        data = png_bytes(src)
        width, height = png_size(data)
        assert width >= 400 and height >= 250
        assert len(data) > 15_000  # empty 9 x 4 inch axes make about 8.5 kB

    ops = analysis.operators
    assert page.header == COLUMNS
    assert page.column("operator") == [op.name for op in ops]
    assert page.column("params") == [f"{op.params:,}" for op in ops]
    assert page.column("matrix") == [f"{op.shape[0]} x {op.shape[1]}" for op in ops]
    assert page.column(f"rank for δ={TABLE_DELTA:g}") == [
        f"{s.rank_for_delta(TABLE_DELTA)} / {s.singular_values.size}" for s in analysis.states
    ]
    labels = page.column("plot label")
    assert len(set(labels)) == len(labels)
    assert all(0 < len(label) <= LABEL_WIDTH for label in labels)

    totals = analysis.to_dict()["totals"]
    body = " ".join(page.text)
    assert f"{totals['params']:,} parameters" in body
    assert f"{totals['flops']:,} FLOPs" in body
    for skipped in analysis.extraction.skipped:
        assert skipped.reason in body


def test_labels_drop_repeated_module_paths(pages: dict[str, str]) -> None:
    """Exporter paths lose their repeated parents and op-type leaf, unless only numbers
    would be left."""
    transformer = Page(pages["transformer_digits"])
    named = dict(zip(transformer.column("operator"), transformer.column("plot label"),
                     strict=True))
    assert named["/layers/layers.0/attn/q_proj/MatMul"] == "layers.0/attn/q_proj"
    assert named["/head/Gemm"] == "head"
    resnet = Page(pages["resnet_digits"])
    named = dict(zip(resnet.column("operator"), resnet.column("plot label"), strict=True))
    assert named["/2/body/body.0/body.0.0/Conv"] == "2/body.0.0"
    assert named["/7/Gemm"] == "7/Gemm"


def hostile_model() -> onnx.ModelProto:
    """One weight operator and one skipped MatMul, both with markup in their names."""
    weight = trained_matrix(3, 4).T  # MatMul stores d_in x d_out
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="<script>x"),
        helper.make_node("MatMul", ["x", "z"], ["u"], name='a&b"<i>'),
    ]
    model = make_model(nodes, [tensor("x", [1, 4]), tensor("z", [4, 2])],
                       [tensor("y", [1, 3]), tensor("u", [1, 2])], [const("w", weight)])
    model.graph.name = "tiny <&> model"
    return model


@pytest.fixture(scope="module")
def hostile() -> tuple[Analysis, str]:
    analysis = analyze(hostile_model(), QUIET)
    return analysis, render_html(analysis)


def test_names_are_escaped(hostile: tuple[Analysis, str]) -> None:
    analysis, text = hostile
    assert [op.name for op in analysis.operators] == ["<script>x"]
    assert "<script" not in text
    assert "&lt;script&gt;x" in text
    assert "<i>" not in text
    assert "tiny <&>" not in text  # the model name, in <title> and <h1>
    page = Page(text)
    assert page.column("operator") == ["<script>x"]
    body = " ".join(page.text)
    assert "tiny <&> model" in body  # the model name, unescaped by the parser
    assert 'a&b"<i>' in body  # the skipped node
    # one operator, no edges: still all four plots
    assert len(page.images) == 4
    for src in page.images:
        assert png_size(png_bytes(src))[0] >= 400


def test_model_without_operators() -> None:
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
                       [tensor("x", [1, 4])], [tensor("y", [1, 4])])
    analysis = analyze(model, QUIET)
    assert analysis.operators == ()
    page = Page(render_html(analysis))
    assert page.images == []
    assert page.rows == []
    body = " ".join(page.text)
    assert "no weight-bearing operators" in body
    assert "0 operators · 0 parameters · 0 FLOPs" in body


def test_many_operators() -> None:
    """Past 60 operators the page still renders: the legends group by op type and the
    heatmap thins its labels (checked here only for a valid page of the right size)."""
    block = trained_matrix(128, 128)
    count = 61
    nodes, inits = [], []
    for i in range(count):
        rows = slice(i, i + 16)  # every block 16 x 16, as the chain of MatMuls needs
        inits.append(const(f"w{i}", block[rows, rows].T))
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"],
                                      name=f"/blocks/blocks.{i}/MatMul"))
    model = make_model(nodes, [tensor("h0", [1, 16])], [tensor(f"h{count}", [1, 16])], inits)
    analysis = analyze(model, QUIET)
    assert len(analysis.operators) == count
    page = Page(render_html(analysis))
    assert len(page.rows) == count
    assert page.column("plot label")[5] == "blocks.5"
    sizes = [png_size(png_bytes(src)) for src in page.images]
    assert len(sizes) == 4
    heatmap_width, heatmap_height = sizes[2]
    assert heatmap_width >= 1000 and heatmap_height >= 1000  # grows with the operators


def test_rendering_is_deterministic_and_thread_safe(hostile: tuple[Analysis, str]) -> None:
    """Two threads render at once and get what one thread gets; no pyplot figure is left.

    Rendering goes through Figure objects with their own Agg canvas, never pyplot's
    global figure registry, and the graph layout has a fixed seed.
    """
    analysis, expected = hostile
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(render_html(analysis)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [expected, expected]
    assert plt.get_fignums() == []


def test_energy_column_matches_an_independent_svd(
    analyses: dict[str, Analysis], pages: dict[str, str]
) -> None:
    """The energy column, against numpy's SVD of the augmented matrix [[W, b], [0, 1]]."""
    analysis = analyses["resnet_digits_bn"]  # folded BatchNorm: the bias matters
    page = Page(pages["resnet_digits_bn"])
    for cell, op in zip(page.column("energy at ¼ rank"), analysis.operators, strict=True):
        rows, cols = op.shape
        augmented = np.zeros((rows + 1, cols + 1))
        augmented[:rows, :cols] = op.weight
        augmented[:rows, cols] = 0.0 if op.bias is None else op.bias
        augmented[rows, cols] = 1.0
        energy = np.linalg.svd(augmented, compute_uv=False) ** 2
        quarter = max(1, round(energy.size / 4))
        percent, rank = cell.removesuffix(")").split(" % (q=")
        assert int(rank) == quarter
        assert float(percent) == pytest.approx(100 * energy[:quarter].sum() / energy.sum(),
                                               abs=0.05 + 1e-9)
