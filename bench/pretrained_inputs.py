"""Real inputs for bench/pretrained.py, built offline, and its task metrics.

* magika: byte features of real files on this machine, extracted as ``magika/magika.py``
  (1.0.3) does;
* rapidocr's PP-OCR models: text lines rendered with Pillow (matplotlib's DejaVu fonts)
  from the module docstrings of the installed CPython standard library, on crops of real
  photographs (scikit-learn's sample images, matplotlib's ``grace_hopper.jpg``),
  preprocessed as the wheel's ``ch_ppocr_*`` modules do;
* metrics: top-1 agreement, greedy CTC decoding agreement, text-mask IoU.
"""

from __future__ import annotations

import ast
import functools
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np

SEED = 0


# --- magika: byte features of real files ---------------------------------------------------

def candidate_files() -> Iterator[Path]:
    roots = [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"],
             "/usr/share", "/usr/bin", "/usr/lib", "/etc"]
    for root in roots:
        for count, (folder, dirs, files) in enumerate(os.walk(root)):
            dirs.sort()
            if count > 4000:
                break
            for file in sorted(files):
                path = Path(folder, file)
                if path.is_file() and not path.is_symlink():
                    yield path


def magika_features(path: Path, config: dict[str, int]) -> list[int] | None:
    """``Magika._extract_features_from_seekable`` (features v2) and its size checks."""
    beg_size, end_size = config["beg_size"], config["end_size"]
    pad, block = config["padding_token"], config["block_size"]
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, 2)
            if size < config["min_file_size_for_dl"]:
                return None
            handle.seek(0)
            beg = list(handle.read(min(block, size)).lstrip()[:beg_size])
            handle.seek(size - min(block, size))
            end_bytes = handle.read(min(block, size)).rstrip()
    except OSError:
        return None
    end = list(end_bytes[len(end_bytes) - end_size:] if len(end_bytes) > end_size
               else end_bytes)
    beg = beg + [pad] * (beg_size - len(beg))
    end = [pad] * (end_size - len(end)) + end
    if beg[config["min_file_size_for_dl"] - 1] == pad:  # too few meaningful bytes
        return None
    return beg + end


def magika_inputs(config: dict[str, int], per_suffix: int, limit: int) -> np.ndarray:
    """Features of up to ``per_suffix`` files of each file-name suffix (a seeded choice),
    then ``limit`` of them (seeded), in a seeded order."""
    by_suffix: dict[str, list[Path]] = {}
    for path in candidate_files():
        by_suffix.setdefault(path.suffix.lower(), []).append(path)
    rng = np.random.default_rng(SEED)
    rows: list[list[int]] = []
    for suffix in sorted(by_suffix):
        paths, taken = by_suffix[suffix], 0
        for index in rng.permutation(len(paths))[: 4 * per_suffix]:
            features = magika_features(paths[index], config)
            if features is not None:
                rows.append(features)
                taken += 1
                if taken == per_suffix:
                    break
    array = np.array(rows, dtype=np.int32)
    return array[rng.permutation(len(array))[:limit]]


# --- OCR: text lines rendered from real text on real photographs ---------------------------

@functools.cache
def docstring_lines() -> list[str]:
    """Lines of 12-36 characters (seeded) from the module docstrings of the standard
    library as installed."""
    rng = np.random.default_rng(SEED)
    words: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        words += [w for w in (doc or "").split() if w.isascii() and w.isprintable()]
    lines: list[str] = []
    line = ""
    width = int(rng.integers(12, 37))
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line, width = "", int(rng.integers(12, 37))
        line = f"{line} {word}" if line else word[:width]
    return lines


@functools.cache
def photographs() -> list[np.ndarray]:
    """RGB photographs shipped by scikit-learn and matplotlib."""
    import matplotlib
    from PIL import Image
    from sklearn.datasets import load_sample_images

    hopper = Path(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    return [*load_sample_images().images, np.asarray(Image.open(hopper).convert("RGB"))]


def fonts() -> list[Path]:
    import matplotlib

    folder = Path(matplotlib.get_data_path(), "fonts", "ttf")
    return [folder / f"{name}.ttf" for name in
            ("DejaVuSans", "DejaVuSerif", "DejaVuSansMono", "DejaVuSans-Bold",
             "DejaVuSerif-Italic")]


def crop(photo: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of ``photo`` (resized up first where it is too small)."""
    from PIL import Image

    scale = max(height / photo.shape[0], width / photo.shape[1], 1.0)
    if scale > 1.0:
        size = (int(np.ceil(photo.shape[1] * scale)), int(np.ceil(photo.shape[0] * scale)))
        photo = np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.BILINEAR))
    top = int(rng.integers(0, photo.shape[0] - height + 1))
    left = int(rng.integers(0, photo.shape[1] - width + 1))
    return photo[top:top + height, left:left + width]


def render_line(text: str, photos: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """``text`` in dark ink on a pale crop of a photograph (RGB, uint8)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(fonts()[int(rng.integers(len(fonts())))]),
                              int(rng.integers(20, 35)))
    box = font.getbbox(text)
    left, top = int(np.floor(box[0])), int(np.floor(box[1]))
    right, bottom = int(np.ceil(box[2])), int(np.ceil(box[3]))
    margin = int(rng.integers(3, 10))
    height, width = bottom - top + 2 * margin, right - left + 2 * margin
    background = crop(photos[int(rng.integers(len(photos)))], height, width, rng)
    pale = 255 - (255 - background.astype(np.float32)) * float(rng.uniform(0.2, 0.5))
    image = Image.fromarray(pale.astype(np.uint8))
    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    ImageDraw.Draw(image).text((margin - left, margin - top), text, font=font, fill=ink)
    return np.asarray(image)


def normalise(image: np.ndarray) -> np.ndarray:
    """BGR (as cv2 reads), ``(x / 255 - 0.5) / 0.5``, channels first."""
    bgr = image[..., ::-1].astype(np.float32) / 255.0
    return ((bgr - 0.5) / 0.5).transpose(2, 0, 1)


def resize_norm(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``resize_norm_img`` of the wheel's ``ch_ppocr_cls`` / ``ch_ppocr_rec``: resized to
    ``height`` (the aspect kept, at most ``width`` wide), normalised, zero-padded."""
    from PIL import Image

    resized_w = min(width, int(np.ceil(height * image.shape[1] / image.shape[0])))
    resized = np.asarray(Image.fromarray(image).resize((resized_w, height),
                                                       Image.Resampling.BILINEAR))
    padded = np.zeros((3, height, width), dtype=np.float32)
    padded[:, :, :resized_w] = normalise(resized)
    return padded


def cls_inputs(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Text lines, half of them rotated by 180 degrees, and that rotation (1) or not (0)."""
    photos, lines = photographs(), docstring_lines()
    labels = rng.integers(0, 2, count)
    images: list[np.ndarray] = []
    for index in rng.choice(len(lines), count, replace=False):
        line = render_line(lines[index], photos, rng)
        images.append(line[::-1, ::-1] if labels[len(images)] else line)
    return np.stack([resize_norm(im, 48, 192) for im in images]), labels


def rec_inputs(count: int, rng: np.random.Generator) -> np.ndarray:
    photos, lines = photographs(), docstring_lines()
    return np.stack([resize_norm(render_line(lines[i], photos, rng), 48, 320)
                     for i in rng.choice(len(lines), count, replace=False)])


def det_inputs(count: int, rng: np.random.Generator, side: int = 256) -> np.ndarray:
    """``side``-square crops of the photographs with 0-4 text lines pasted on them."""
    photos, lines = photographs(), docstring_lines()
    images = []
    for _ in range(count):
        canvas = crop(photos[int(rng.integers(len(photos)))], side, side, rng).copy()
        for _ in range(int(rng.integers(0, 5))):
            line = render_line(lines[int(rng.integers(len(lines)))], photos, rng)
            line = line[:, : side - 8]
            top = int(rng.integers(0, side - line.shape[0]))
            left = int(rng.integers(0, side - line.shape[1] + 1))
            canvas[top:top + line.shape[0], left:left + line.shape[1]] = line
        images.append(normalise(canvas))
    return np.stack(images)


# --- metrics -------------------------------------------------------------------------------

def top1(reference: list[np.ndarray], output: list[np.ndarray]) -> float:
    return float(np.mean(reference[0].argmax(-1) == output[0].argmax(-1)))


def ctc_greedy(probabilities: np.ndarray) -> list[tuple[int, ...]]:
    """The wheel's ``CTCLabelDecode``: argmax, repeats collapsed, blanks (0) dropped."""
    decoded = []
    for row in probabilities.argmax(-1):
        keep = np.ones(len(row), dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        decoded.append(tuple(int(v) for v in row[keep & (row != 0)]))
    return decoded


def same_text(reference: list[np.ndarray], output: list[np.ndarray]) -> float:
    return float(np.mean([a == b for a, b in zip(ctc_greedy(reference[0]),
                                                 ctc_greedy(output[0]), strict=True)]))


def mask_iou(reference: list[np.ndarray], output: list[np.ndarray]) -> float:
    a, b = reference[0] > 0.3, output[0] > 0.3
    union = int(np.count_nonzero(a | b))
    return 1.0 if union == 0 else int(np.count_nonzero(a & b)) / union
