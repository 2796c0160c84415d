"""qmpass on real pretrained models that PyPI packages ship inside their wheels (issue 12).

The wheels are fetched by this script (``pip download --no-deps``, pinned versions) into a
cache folder, never at test time; the ``.onnx`` files are read from the wheel as shipped.

* ``magika`` (Google's byte-level file-type CNN, 214 content types): inputs are the byte
  features of real files on this machine (the Python installation, ``/usr``, ``/etc``),
  extracted exactly as ``magika/magika.py`` in the wheel does (the first and last
  ``block_size`` bytes, whitespace-stripped, ``beg_size``/``end_size`` bytes kept, padded
  with ``padding_token``; files with fewer than ``min_file_size_for_dl`` meaningful bytes are
  not sent to the model, as magika does not send them). Metric: top-1 agreement with the
  original model.
* ``rapidocr-onnxruntime`` (PaddleOCR's PP-OCR models): text lines rendered with Pillow
  (matplotlib's DejaVu fonts) from the module docstrings of the CPython standard library
  as installed, in dark ink on crops of real photographs (scikit-learn's sample images
  and matplotlib's ``grace_hopper.jpg``), preprocessed as the wheel's ``ch_ppocr_*``
  modules do (BGR, ``/255``, ``(x - 0.5) / 0.5``, resized to the configured height and
  zero-padded to the configured width).

  - text direction classifier (``cls``, 0 / 180 degrees): half of the lines are rotated
    by 180 degrees. Metrics: top-1 agreement with the original; accuracy on the true
    rotation (the original's in brackets).
  - text recogniser (``rec``, CTC over 6625 symbols, 48 x 320 lines): metric: the share
    of lines whose greedy CTC decoding (argmax, repeats collapsed, blanks dropped, as the
    wheel's ``CTCLabelDecode``) equals the original's.
  - text detector (``det``, DB segmentation): 256 x 256 photograph crops with 0-4 text
    lines pasted (the package resizes to a 736 short side; smaller here for time).
    Metric: IoU of the text mask (probability > 0.3, the package's ``thresh``) with the
    original's.

Each model's inputs are split by a fixed seed into calibration inputs, which qmpass fits
(and verifies) on, and held-out inputs, which it never sees; every error and metric is
measured on the held-out inputs. For ``keep`` in 0.75 / 0.5 / 0.25 (budget mode) and the
methods ``svd`` (plain truncated SVD), ``whitened`` (whitened truncation of every
operator alone; note: its ranks come from the same Lagrangian allocation as the default,
not uniform ranks, which no qmpass method offers) and qmpass's default: the measured
kept fraction of weight parameters, the held-out relative output error, the task metric
and the time ``compress`` took (wall and process CPU seconds).

``python bench/pretrained.py [--cache DIR] [--models magika,cls,rec,det] [--keeps ...]``
(needs scikit-learn, the ``models`` extra, for the sample photographs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pretrained_inputs import (  # noqa: E402
    SEED,
    cls_inputs,
    det_inputs,
    magika_inputs,
    mask_iou,
    rec_inputs,
    same_text,
    top1,
)

from qmpass import CompressConfig, compress  # noqa: E402
from qmpass.errors import QmpassInputError  # noqa: E402
from qmpass.verify import check_feeds, compare, run_batched, session  # noqa: E402

KEEPS = (0.75, 0.5, 0.25)
METHODS: dict[str, dict[str, str]] = {
    "svd": {"method": "svd"},
    "whitened": {"method": "whitened"},
    "qmfrg (default)": {},
}
MAGIKA = ("magika", "1.0.3", "manylinux_2_28_x86_64")  # the model is the same in every wheel
RAPIDOCR = ("rapidocr-onnxruntime", "1.4.4", None)
Feeds = dict[str, np.ndarray]
Metric = Callable[[list[np.ndarray], list[np.ndarray]], float]


# --- fetching ------------------------------------------------------------------------------

def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qmpass" / "pretrained"


def fetch_wheel(package: tuple[str, str, str | None], cache: Path) -> zipfile.ZipFile:
    """The pinned wheel of ``package`` from the cache, downloaded with pip if absent."""
    name, version, platform = package
    stem = name.replace("-", "_")
    found = sorted(cache.glob(f"{stem}-{version}-*.whl"))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                   "--only-binary=:all:", f"{name}=={version}", "-d", str(cache)]
        if platform:
            command += ["--platform", platform]
        subprocess.run(command, check=True)
        found = sorted(cache.glob(f"{stem}-{version}-*.whl"))
    return zipfile.ZipFile(found[0])


def read_model(wheel: zipfile.ZipFile, member: str) -> onnx.ModelProto:
    return onnx.load_from_string(wheel.read(member))


# --- the benchmark -------------------------------------------------------------------------

@dataclass
class Case:
    """A model, its calibration and held-out inputs, and how its task is scored."""

    name: str
    model: onnx.ModelProto
    calib: np.ndarray
    heldout: np.ndarray
    metric: Metric
    metric_name: str
    notes: list[str]


def split(inputs: np.ndarray, calib: int) -> tuple[np.ndarray, np.ndarray]:
    """Calibration and held-out parts of seeded inputs (already in a seeded order)."""
    return inputs[:calib], inputs[calib:]


def magika_case(cache: Path) -> Case:
    wheel = fetch_wheel(MAGIKA, cache)
    folder = "magika/models/standard_v3_3"
    config = json.loads(wheel.read(f"{folder}/config.min.json"))
    inputs = magika_inputs(config, per_suffix=6, limit=384)
    calib, heldout = split(inputs, 128)
    return Case("magika", read_model(wheel, f"{folder}/model.onnx"), calib, heldout, top1,
                "top-1 agreement", [f"{len(inputs)} files, {len(set(map(bytes, inputs)))} "
                                    "distinct feature rows"])


def ocr_case(cache: Path, which: str) -> Case:
    wheel = fetch_wheel(RAPIDOCR, cache)
    member, calib_n, heldout_n = {
        "cls": ("ch_ppocr_mobile_v2.0_cls_infer", 48, 96),
        "rec": ("ch_PP-OCRv4_rec_infer", 32, 64),
        "det": ("ch_PP-OCRv4_det_infer", 16, 32),
    }[which]
    model = read_model(wheel, f"rapidocr_onnxruntime/models/{member}.onnx")
    rng = np.random.default_rng([SEED, ord(which[0])])
    notes: list[str] = []
    if which == "cls":
        inputs, labels = cls_inputs(calib_n + heldout_n, rng)
        held_labels = labels[calib_n:]
        original = run_batched(model, {"x": inputs[calib_n:]}, 16)[0].argmax(-1)
        notes.append(f"accuracy on the true rotation, original: "
                     f"{np.mean(original == held_labels):.4f}")
        metric: Metric = top1
        name = "top-1 agreement"
    elif which == "rec":
        inputs, metric, name = rec_inputs(calib_n + heldout_n, rng), same_text, "same text"
    else:
        inputs, metric, name = det_inputs(calib_n + heldout_n, rng), mask_iou, "mask IoU"
    calib, heldout = split(inputs, calib_n)
    return Case(f"{which} ({member})", model, calib, heldout, metric, name, notes)


def distinct_unknown_dims(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose graph inputs name each ``?`` dimension apart (``x_dim2``, ...)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for value in copy.graph.input:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.dim_param == "?":
                dim.dim_param = f"{value.name}_dim{axis}"
    return copy


def run_case(case: Case, keeps: tuple[float, ...]) -> Iterator[str]:
    """The table's rows for ``case``; refusals are rows too."""
    name = case.model.graph.input[0].name
    model = case.model
    try:
        check_feeds({name: case.calib}, model)
    except QmpassInputError as exc:
        case.notes.append(f"qmpass refuses the model as shipped: {exc} Compressed here "
                          "with its '?' input dimensions renamed apart.")
        model = distinct_unknown_dims(model)
    heldout = {name: case.heldout}
    reference = run_batched(session(model), heldout, 16)
    for keep in keeps:
        for label, extra in METHODS.items():
            started, cpu = time.perf_counter(), time.process_time()
            try:
                out, report = compress(model, CompressConfig(
                    keep=keep, calib={name: case.calib}, **extra))  # type: ignore[arg-type]
            except QmpassInputError as exc:
                yield f"| {case.name} | {keep} | {label} | refused: {exc} | | | |"
                continue
            except Exception as exc:  # a crash is a finding: record it, go on
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                yield f"| {case.name} | {keep} | {label} | crashed: {type(exc).__name__}: " \
                      f"{first} | | | |"
                continue
            seconds = time.perf_counter() - started
            cpu = time.process_time() - cpu
            output = run_batched(session(out), heldout, 16)
            error = compare(reference, output, len(case.heldout)).relative_error
            kept = report.to_dict()["keep_achieved"]
            yield (f"| {case.name} | {keep} | {label} | {kept:.3f} | {error:.4f} | "
                   f"{case.metric(reference, output):.4f} | {seconds:.0f} / {cpu:.0f} |")


BUILDERS: dict[str, Callable[[Path], Case]] = {
    "magika": magika_case,
    "cls": lambda cache: ocr_case(cache, "cls"),
    "rec": lambda cache: ocr_case(cache, "rec"),
    "det": lambda cache: ocr_case(cache, "det"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=default_cache(),
                        help="folder for the downloaded wheels (default: %(default)s)")
    parser.add_argument("--models", default=",".join(BUILDERS),
                        help="comma-separated subset of %(default)s")
    parser.add_argument("--keeps", default=",".join(map(str, KEEPS)),
                        help="comma-separated keep budgets (default: %(default)s)")
    args = parser.parse_args(argv)
    args.models = args.models.split(",")
    unknown = [m for m in args.models if m not in BUILDERS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from "
                     f"{', '.join(BUILDERS)}")
    try:
        args.keeps = tuple(float(k) for k in args.keeps.split(","))
    except ValueError:
        parser.error(f"--keeps takes numbers separated by commas, got {args.keeps!r}")
    if not all(0.0 < keep <= 1.0 for keep in args.keeps):
        parser.error(f"every --keeps budget must be in (0, 1], got {args.keeps}")
    return args


def versions() -> str:
    import onnxruntime

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    pins = ", ".join(f"{name}=={version}" for name, version, _ in (MAGIKA, RAPIDOCR))
    return (f"{pins}; qmpass {commit}; onnx {onnx.__version__}, onnxruntime "
            f"{onnxruntime.__version__}, numpy {np.__version__}; Python "
            f"{sys.version.split()[0]}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    print(versions())
    print(f"load average at the start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("\n| model | keep | method | kept (measured) | held-out rel. error | task metric "
          "| compress s (wall / CPU) |")
    print("|---|---|---|---:|---:|---:|---:|")
    notes: list[str] = []
    for key in args.models:
        try:
            case = BUILDERS[key](args.cache)
        except subprocess.CalledProcessError as exc:
            print(f"could not download a wheel for {key} (pip exited {exc.returncode}); "
                  f"put it in {args.cache} or give --cache a folder holding it.",
                  file=sys.stderr)
            return 2
        except ImportError as exc:
            print(f"{key} needs {exc.name} for its inputs; install the models extra "
                  "(pip install -e \".[models]\").", file=sys.stderr)
            return 2
        for row in run_case(case, args.keeps):
            print(row, flush=True)
        notes += [f"{case.name}: {case.metric_name}, {len(case.calib)} calibration / "
                  f"{len(case.heldout)} held-out inputs"] + \
                 [f"{case.name}: {note}" for note in case.notes]
    print()
    for note in notes:
        print(f"* {note}")
    print(f"\n{time.perf_counter() - started:.0f} s; load average at the end "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
