"""Data preflight: find what is wrong with a detection dataset before a long run trains on it.

Two entry points, both returning a :class:`PreflightReport`:

* :func:`check_lvis_json` checks a raw LVIS/COCO-format json (and, given an image root, its image
  files): the schema (top-level lists, per-record fields and types), unique image / annotation /
  category ids, annotations of unknown images or categories, ``neg_category_ids`` /
  ``not_exhaustive_category_ids`` of unknown categories, degenerate boxes and polygons.
* :func:`check_dataset_dicts` (and :func:`check_registered_dataset`, which loads a name from
  ``DatasetCatalog``) runs the same per-instance checks on detectron2 dataset dicts, with
  contiguous category ids checked against ``thing_classes``.

Both look for missing image files; ``full=True`` also decodes every image and compares its size
with the recorded height and width, as training would.

A problem is an *error* when training would crash on it, or the data is wrong beyond doubt (a
missing file, a duplicate id, a box with no pixel in its image); a *warning* when detectron2 copes
(it clips a box that overshoots the border and drops an empty one) and real datasets have a few.
A zero-size box is a warning for that reason (COCO-style datasets hold a handful; detectron2's
``filter_empty_instances`` drops them), a negative or non-finite one an error.

The cheap checks are vectorised with numpy where the records allow (boxes, polygon areas, ids):
an LVIS-sized dataset (100k images, 1.3M annotations) took 23 s as a json and 34 s as dataset
dicts on a shared 2-core machine, image-file tests (one ``os.path.isfile`` per image) included.
"""
import itertools
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog, detection_utils
from detectron2.structures import BoxMode
from detectron2.utils import comm

from .json_io import read_json_object

logger = logging.getLogger(__name__)

__all__ = [
    "PROBLEM_KINDS",
    "DatasetPreflightError",
    "PreflightReport",
    "check_dataset_dicts",
    "check_lvis_json",
    "check_registered_dataset",
    "preflight_training_datasets",
]

ERROR, WARNING = "error", "warning"

# Boxes derived from polygons overshoot the border by rounding (LVIS/COCO: up to about half a
# pixel); only more than this is reported.
BOX_TOLERANCE_PX = 1.0
# Shoelace areas below this (px^2) are zero up to float rounding.
_ZERO_AREA = 1e-6
# Annotations whose polygons are flattened into one array at a time (bounds the memory).
_POLYGON_CHUNK = 200_000


@dataclass(frozen=True)
class ProblemKind:
    severity: str
    description: str


# Every problem the checks can report, in the order summaries list them.
PROBLEM_KINDS: Dict[str, ProblemKind] = {
    "invalid_json": ProblemKind(
        ERROR, "not an LVIS/COCO-format json (an object with `images`, `annotations` and "
        "`categories` lists)"),
    "dataset_not_loadable": ProblemKind(
        ERROR, "the dataset is not registered, or its loader failed"),
    "invalid_category_record": ProblemKind(
        ERROR, "category records without an integer `id` or a string `name`"),
    "invalid_image_record": ProblemKind(
        ERROR, "image records with a missing or mistyped field (`id`, positive integer `height` "
        "and `width`, `file_name` or `coco_url`, lists of category ids)"),
    "invalid_annotation_record": ProblemKind(
        ERROR, "annotation records with a missing or mistyped field (`id`, `image_id`, "
        "`category_id`, `bbox` of 4 numbers, `segmentation` as polygons or RLE)"),
    "duplicate_category_id": ProblemKind(ERROR, "category ids used by more than one category"),
    "duplicate_image_id": ProblemKind(ERROR, "image ids used by more than one image"),
    "duplicate_annotation_id": ProblemKind(
        ERROR, "annotation ids used by more than one annotation"),
    "unknown_image_id": ProblemKind(ERROR, "annotations of an image id that is not in `images`"),
    "unknown_category_id": ProblemKind(ERROR, "annotations of a category that does not exist"),
    "degenerate_box": ProblemKind(ERROR, "boxes with a negative width or height, or a non-finite "
                                  "coordinate"),
    "box_outside_image": ProblemKind(ERROR, "boxes that do not overlap their image at all"),
    "degenerate_polygon": ProblemKind(
        ERROR, "polygons with fewer than 3 points, an odd number of coordinates, or coordinates "
        "that are not finite numbers (detectron2's PolygonMasks rejects them)"),
    "missing_image": ProblemKind(ERROR, "image files that do not exist"),
    "unreadable_image": ProblemKind(ERROR, "image files that cannot be decoded"),
    "image_size_mismatch": ProblemKind(
        ERROR, "images whose decoded size is not the recorded width x height"),
    "empty_box": ProblemKind(
        WARNING, "boxes of zero width or height (detectron2 drops them in training)"),
    "box_beyond_image": ProblemKind(
        WARNING, f"boxes that extend more than {BOX_TOLERANCE_PX:g} px beyond the image border (training "
        "clips them)"),
    "empty_segmentation": ProblemKind(
        WARNING, "annotations with an empty polygon list (with MASK_ON detectron2 drops them "
        "from training)"),
    "zero_area_polygon": ProblemKind(
        WARNING, "annotations whose polygons enclose no area (an empty mask)"),
    "unknown_neg_category_id": ProblemKind(
        WARNING, "`neg_category_ids` / `not_exhaustive_category_ids` naming categories that do "
        "not exist (LVIS evaluation reads them)"),
}


class DatasetPreflightError(ValueError):
    """Training data failed the preflight; the message lists the problems and what to run."""


class PreflightReport:
    """Per-problem counts and the first offending records of one dataset check.

    Attributes:
        dataset: the dataset name (or the json file) checked.
        mode: "cheap" or "full".
        counts: problem kind -> number of offending records (kinds of :data:`PROBLEM_KINDS`).
        records: problem kind -> descriptions of the first ``max_records`` offenders.
        notes: what was not checked, and why.
    """

    def __init__(self, dataset: str, mode: str = "cheap", max_records: int = 5):
        self.dataset = dataset
        self.mode = mode
        self.max_records = max_records
        self.num_images = 0
        self.num_annotations = 0
        self.num_categories = 0
        self.seconds = 0.0
        self.counts: Dict[str, int] = {}
        self.records: Dict[str, List[str]] = {}
        self.notes: List[str] = []

    def add(self, kind: str, count: int, records: Iterable[str]) -> None:
        """Count ``count`` offenders of ``kind``; ``records`` describes them in order (only the
        first ``max_records`` are read, so it may be a lazy generator)."""
        if kind not in PROBLEM_KINDS:
            raise KeyError(f"unknown preflight problem kind {kind!r}")
        if count <= 0:
            return
        self.counts[kind] = self.counts.get(kind, 0) + count
        kept = self.records.setdefault(kind, [])
        for record in records:
            if len(kept) >= self.max_records:
                break
            kept.append(record)

    def _by_severity(self, severity: str) -> Dict[str, int]:
        return {k: n for k, n in self._ordered() if PROBLEM_KINDS[k].severity == severity}

    def _ordered(self):
        return [(k, self.counts[k]) for k in PROBLEM_KINDS if k in self.counts]

    @property
    def errors(self) -> Dict[str, int]:
        return self._by_severity(ERROR)

    @property
    def warnings(self) -> Dict[str, int]:
        return self._by_severity(WARNING)

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not self.errors

    def summary(self, severities: Sequence[str] = (ERROR, WARNING)) -> str:
        """A readable summary: what was checked, then each problem kind with its count and first
        records (errors first)."""
        lines = [
            f"Data check of {self.dataset} ({self.mode}): {self.num_images} images, "
            f"{self.num_annotations} annotations, {self.num_categories} categories "
            f"({self.seconds:.1f} s)."
        ]
        for severity, title in ((ERROR, "Errors"), (WARNING, "Warnings")):
            kinds = self._by_severity(severity)
            if not kinds or severity not in severities:
                continue
            lines.append(f"{title}:")
            for kind, count in kinds.items():
                lines.append(f"  {kind}: {count} - {PROBLEM_KINDS[kind].description}")
                shown = self.records.get(kind, [])
                lines.extend(f"    {r}" for r in shown)
                if count > len(shown):
                    lines.append(f"    ... and {count - len(shown)} more")
        lines.extend(f"Note: {n}" for n in self.notes)
        if self.ok:
            verdict = f"{len(self.warnings)} kind(s) of warnings" if self.counts else "no problems"
            lines.append(f"Result: OK ({verdict}).")
        else:
            lines.append(f"Result: {sum(self.errors.values())} error(s) of {len(self.errors)} "
                         "kind(s).")
        return "\n".join(lines)


# ---- the tables both inputs are reduced to -------------------------------------------------------
@dataclass
class _Images:
    ids: list
    names: List[Optional[str]]  # the file of each image as messages name it
    files: List[Optional[str]]  # the paths to check; None where not checked
    heights: np.ndarray  # (I,) float; NaN where invalid or absent
    widths: np.ndarray

    def describe(self, pos: int) -> str:
        name = f" ({self.names[pos]})" if self.names[pos] else ""
        return f"image {self.ids[pos]!r}{name}"


@dataclass
class _Annotations:
    describe: Callable[[int], str]  # position -> "annotation 8 of image 2 (a.png)"
    image_pos: np.ndarray  # (A,) int64; -1 where the image is unknown
    boxes: np.ndarray  # (A, 4) float64 XYWH; rows of invalid records are NaN and not checked
    checked: np.ndarray  # (A,) bool: the record is well-formed, check its geometry
    segmentations: list  # per annotation: list of polygons, an RLE dict, or None


def _is_int(x) -> bool:
    # `type(x) is int` first: these checks run once per annotation, and that is the common case
    return type(x) is int or (
        isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)))


def _is_number(x) -> bool:
    return type(x) in (float, int) or (
        isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool))


def _is_box_like(bbox) -> bool:
    """A sequence of 4 things (whether they are numbers is checked by :func:`_box_array`)."""
    return type(bbox) is list and len(bbox) == 4 or (
        isinstance(bbox, (list, tuple, np.ndarray)) and len(bbox) == 4)


def _box_array(rows: list):
    """The candidate boxes ``rows`` as a (B, 4) float64 array and the mask of rows that are 4
    numbers (the others are NaN). One ``np.array`` call when all are; row by row when not."""
    if not rows:
        return np.zeros((0, 4)), np.zeros(0, bool)
    try:
        arr = np.array(rows)
        if arr.shape == (len(rows), 4) and arr.dtype.kind in "iuf":
            return arr.astype(np.float64), np.ones(len(rows), bool)
    except (TypeError, ValueError):  # ragged or mixed rows
        pass
    ok = np.array([all(_is_number(v) for v in r) for r in rows], bool)
    arr = np.full((len(rows), 4), np.nan)
    for i in np.flatnonzero(ok):
        arr[i] = [float(v) for v in rows[i]]
    return arr, ok


def _segmentation_problem(segm) -> Optional[str]:
    """Why ``segm`` is neither a list of polygons nor an RLE dict (None when it is one of them;
    the polygons themselves are checked by :func:`_check_polygons`)."""
    if type(segm) is list:
        return None
    if isinstance(segm, dict):
        return None if "counts" in segm and "size" in segm else "an RLE without counts/size"
    return f"of type {type(segm).__name__}"


def _first(indices: np.ndarray, describe: Callable[[int], str], n: int) -> List[str]:
    return [describe(int(i)) for i in indices[:n]]


def _fmt_box(box) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


# ---- shared checks -----------------------------------------------------------------------------
def _check_duplicates(report, kind, ids, describe, what) -> None:
    """Report records whose id an earlier record already has (ids of None are skipped)."""
    counts = Counter(i for i in ids if i is not None)
    dup = {i: n for i, n in counts.items() if n > 1}
    if not dup:
        return
    first_pos = {}
    for pos, i in enumerate(ids):
        if i in dup:
            first_pos.setdefault(i, []).append(pos)
    records = (
        f"{what} id {i!r} is used {dup[i]} times: " + "; ".join(describe(p) for p in pos[:3])
        for i, pos in first_pos.items()
    )
    report.add(kind, sum(n - 1 for n in dup.values()), records)


def _check_neg_ids(report, images: _Images, neg_lists, known: set) -> None:
    """``neg_lists``: per image (neg_category_ids, not_exhaustive_category_ids), dataset ids."""
    bad = []
    for pos, lists in enumerate(neg_lists):
        # malformed lists are invalid_image_record already
        unknown = sorted({c for ids in lists if isinstance(ids, list) for c in ids
                          if _is_int(c) and c not in known})
        if unknown:
            bad.append((pos, unknown))
    report.add("unknown_neg_category_id", len(bad),
               (f"{images.describe(p)}: category ids {u[:5]}" for p, u in bad))


def _check_boxes(report, images: _Images, anns: _Annotations) -> None:
    boxes, describe, n = anns.boxes, anns.describe, report.max_records
    checked = anns.checked
    finite = np.isfinite(boxes).all(axis=1)
    w, h = boxes[:, 2], boxes[:, 3]
    with np.errstate(invalid="ignore"):
        degenerate = checked & (~finite | (w < 0) | (h < 0))
        empty = checked & finite & ~degenerate & ((w == 0) | (h == 0))
    fmt = lambda i: f"{describe(i)}: bbox {_fmt_box(boxes[i])} (x, y, w, h)"  # noqa: E731
    report.add("degenerate_box", int(degenerate.sum()), _first(np.flatnonzero(degenerate), fmt, n))
    report.add("empty_box", int(empty.sum()), _first(np.flatnonzero(empty), fmt, n))

    # Position against the image, where its size is known.
    good = checked & finite & ~degenerate & ~empty & (anns.image_pos >= 0)
    idx = np.flatnonzero(good)
    W, H = images.widths[anns.image_pos[idx]], images.heights[anns.image_pos[idx]]
    has_size = np.isfinite(W) & np.isfinite(H)
    idx, W, H = idx[has_size], W[has_size], H[has_size]
    x0, y0 = boxes[idx, 0], boxes[idx, 1]
    x1, y1 = x0 + boxes[idx, 2], y0 + boxes[idx, 3]
    outside = (x1 <= 0) | (y1 <= 0) | (x0 >= W) | (y0 >= H)
    t = BOX_TOLERANCE_PX
    beyond = ~outside & ((x0 < -t) | (y0 < -t) | (x1 > W + t) | (y1 > H + t))

    def fmt_pos(k):
        i = int(idx[k])
        return f"{fmt(i)} in an image of {W[k]:g} x {H[k]:g} (w x h)"

    for kind, mask in (("box_outside_image", outside), ("box_beyond_image", beyond)):
        report.add(kind, int(mask.sum()), _first(np.flatnonzero(mask), fmt_pos, n))


def _check_polygons(report, anns: _Annotations) -> None:
    """Polygons: < 3 points, odd length, non-numbers or non-finite (errors); annotations whose
    polygons enclose no area, or that have none (warnings). Vectorised per chunk: the polygons of
    a chunk are concatenated and their shoelace areas summed with ``np.add.reduceat``."""
    degenerate, empty, zero_area = {}, [], []
    segms = anns.segmentations
    for start in range(0, len(segms), _POLYGON_CHUNK):
        polys, owners = [], []
        for i in range(start, min(start + _POLYGON_CHUNK, len(segms))):
            segm = segms[i]
            if type(segm) is not list:  # RLE, or not checked
                continue
            if not segm:
                empty.append(i)
                continue
            for k, poly in enumerate(segm):
                if type(poly) is not list and not isinstance(poly, (tuple, np.ndarray)):
                    degenerate.setdefault(i, f"polygon {k} is a {type(poly).__name__}, not a "
                                             "list of numbers")
                elif len(poly) % 2 or len(poly) < 6:
                    degenerate.setdefault(i, f"polygon {k} has {len(poly)} coordinates")
                else:
                    polys.append(poly)
                    owners.append(i)
        if not polys:
            continue
        lengths, owners = np.fromiter(map(len, polys), np.int64, len(polys)), np.asarray(owners)
        try:
            coords = np.fromiter(itertools.chain.from_iterable(polys), np.float64,
                                 int(lengths.sum()))
        except (TypeError, ValueError):
            # Some polygon holds something other than numbers (e.g. [x, y] pairs): find which,
            # one polygon at a time, and leave those out of the area check.
            keep = np.ones(len(polys), bool)
            for j, poly in enumerate(polys):
                try:
                    keep[j] = np.asarray(poly, np.float64).ndim == 1
                except (TypeError, ValueError):
                    keep[j] = False
                if not keep[j]:
                    degenerate.setdefault(int(owners[j]), "a polygon is not a flat list of "
                                                          "numbers [x1, y1, x2, y2, ...]")
            polys = [p for p, k in zip(polys, keep) if k]
            lengths, owners = lengths[keep], owners[keep]
            if not polys:
                continue
            coords = np.concatenate([np.asarray(p, np.float64) for p in polys])
        xs, ys = coords[0::2], coords[1::2]
        npts = lengths // 2
        starts = np.concatenate([[0], np.cumsum(npts)[:-1]])
        nxt = np.arange(1, len(xs) + 1)
        nxt[starts + npts - 1] = starts  # each polygon closes on its own first point
        bad_pt = ~(np.isfinite(xs) & np.isfinite(ys))
        nonfinite = np.add.reduceat(bad_pt.astype(np.int64), starts) > 0
        for i in np.unique(owners[nonfinite]):
            degenerate.setdefault(int(i), "a polygon has a non-finite coordinate")
        with np.errstate(invalid="ignore", over="ignore"):
            cross = xs * ys[nxt] - xs[nxt] * ys
            area = np.abs(np.add.reduceat(cross, starts)) / 2
        # an instance's mask is empty when all its polygons together enclose no area
        per_ann = np.bincount(owners - start, weights=np.where(nonfinite, 0.0, area))
        candidates = np.unique(owners)
        zero = candidates[per_ann[candidates - start] < _ZERO_AREA]
        zero_area.extend(int(i) for i in zero if int(i) not in degenerate)
    describe = anns.describe
    report.add("degenerate_polygon", len(degenerate),
               (f"{describe(i)}: {why}" for i, why in sorted(degenerate.items())))
    report.add("empty_segmentation", len(empty), (describe(i) for i in empty))
    report.add("zero_area_polygon", len(zero_area), (describe(i) for i in sorted(zero_area)))


def _check_files(report, images: _Images, full: bool, workers: int) -> None:
    missing = [p for p, f in enumerate(images.files) if f is not None and not os.path.isfile(f)]
    report.add("missing_image", len(missing), (images.describe(p) for p in missing))
    if not full:
        return
    missing_set = set(missing)
    todo = [p for p, f in enumerate(images.files) if f is not None and p not in missing_set]

    def decode(pos):
        try:
            # detectron2's own reader, EXIF rotation included: the size training will see
            image = detection_utils.read_image(images.files[pos])
        except Exception as e:  # any failure to decode is the finding
            return pos, f"{type(e).__name__}: {e}", None
        return pos, None, image.shape[:2]

    unreadable, mismatch = [], []
    # PIL's decoders release the GIL, so threads decode in parallel
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for pos, error, shape in pool.map(decode, todo, chunksize=16):
            if error is not None:
                unreadable.append((pos, error))
                continue
            expected = (images.heights[pos], images.widths[pos])
            if np.isfinite(expected).all() and tuple(shape) != expected:
                mismatch.append((pos, shape, expected))
    report.add("unreadable_image", len(unreadable),
               (f"{images.describe(p)}: {e}" for p, e in unreadable))
    report.add("image_size_mismatch", len(mismatch), (
        f"{images.describe(p)}: decoded {s[1]} x {s[0]}, recorded {e[1]:g} x {e[0]:g} (w x h)"
        for p, s, e in mismatch))


def _finish(report, images, anns, full, image_files_known, workers, started):
    _check_boxes(report, images, anns)
    _check_polygons(report, anns)
    if image_files_known:
        _check_files(report, images, full, workers)
    elif full:
        report.notes.append("images were not decoded: no image root was given")
    report.seconds = time.perf_counter() - started
    return report


def _default_workers() -> int:
    return min(8, os.cpu_count() or 1)


# ---- raw json ----------------------------------------------------------------------------------
def image_path(img: dict, image_root: str) -> str:
    """Where longtail's LVIS-style loader looks for an image: ``image_root/file_name``, or for
    LVIS's own jsons (no file_name) the split folder and file of ``coco_url``."""
    if "file_name" in img:
        return os.path.join(image_root, img["file_name"])
    return os.path.join(image_root, *img["coco_url"].split("/")[-2:])


def check_lvis_json(
    json_file,
    image_root: Optional[str] = None,
    *,
    full: bool = False,
    max_records: int = 5,
    name: Optional[str] = None,
    workers: Optional[int] = None,
) -> PreflightReport:
    """Check an LVIS/COCO-format json (see the module docstring for what is checked).

    Args:
        json_file: path of the json, or its already-loaded content (a dict).
        image_root: folder the images are found in (see :func:`image_path`); None skips the
            file checks.
        full: also decode every image and compare its size with the json's height/width.
        max_records: offending records kept per problem kind.
        name: how the report names the dataset (default: the json file).
        workers: threads decoding images in ``full`` mode (default: up to 8 CPU cores).
    """
    started = time.perf_counter()
    label = name or (json_file if isinstance(json_file, str) else "<json>")
    report = PreflightReport(label, "full" if full else "cheap", max_records)
    if isinstance(json_file, str):
        try:
            data = read_json_object(json_file, f"{label}: annotation file", "")
        except (FileNotFoundError, ValueError) as e:
            report.add("invalid_json", 1, [str(e)])
            return report
    else:
        data = json_file
    missing = [k for k in ("images", "annotations", "categories")
               if not isinstance(data.get(k), list)]
    if missing:
        report.add("invalid_json", 1, [f"no `{k}` list" for k in missing])
        return report
    report.num_images = len(data["images"])
    report.num_annotations = len(data["annotations"])
    report.num_categories = len(data["categories"])

    # categories
    cat_ids, bad = [], []
    for pos, cat in enumerate(data["categories"]):
        has_id = isinstance(cat, dict) and _is_int(cat.get("id"))
        # a category with an id is known even when its name is broken: one error, not a cascade
        cat_ids.append(cat["id"] if has_id else None)
        if not (has_id and isinstance(cat.get("name"), str)):
            bad.append(f"category #{pos}: {_short(cat)}")
    report.add("invalid_category_record", len(bad), bad)
    _check_duplicates(report, "duplicate_category_id", cat_ids,
                      lambda p: f"category {data['categories'][p].get('name')!r}", "category")
    known_cats = {c for c in cat_ids if c is not None}

    images = _json_images(report, data["images"], image_root)
    image_index = {}
    for pos, iid in enumerate(images.ids):
        if iid is not None:
            image_index.setdefault(iid, pos)
    _check_neg_ids(report, images, [
        (img.get("neg_category_ids", []), img.get("not_exhaustive_category_ids", []))
        if isinstance(img, dict) else () for img in data["images"]
    ], known_cats)

    anns = _json_annotations(report, data["annotations"], images, image_index, known_cats)
    return _finish(report, images, anns, full, image_root is not None,
                   workers or _default_workers(), started)


def _short(record, limit: int = 120) -> str:
    text = repr(record)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_images(report, records, image_root) -> _Images:
    ids, names, heights, widths, bad = [], [], [], [], []
    for pos, img in enumerate(records):
        why = None
        if not isinstance(img, dict):
            why = "not an object"
        elif not _is_int(img.get("id")):
            why = f"`id` {img.get('id')!r} is not an integer"
        elif not (_is_int(img.get("height")) and img["height"] > 0
                  and _is_int(img.get("width")) and img["width"] > 0):
            why = f"`height` {img.get('height')!r} / `width` {img.get('width')!r} are not " \
                  "positive integers"
        elif not (isinstance(img.get("file_name"), str) or isinstance(img.get("coco_url"), str)):
            why = "neither `file_name` nor `coco_url` is a string"
        elif not all(isinstance(img.get(k, []), list) and all(_is_int(c) for c in img.get(k, []))
                     for k in ("neg_category_ids", "not_exhaustive_category_ids")):
            why = "`neg_category_ids` / `not_exhaustive_category_ids` are not lists of ids"
        if why is not None:
            bad.append(f"image #{pos} ({_short(img, 80)}): {why}")
            # an image with an id is known even when its record is broken: one error, not one
            # per annotation of it
            ids.append(img["id"] if isinstance(img, dict) and _is_int(img.get("id")) else None)
            names.append(None)
            heights.append(np.nan)
            widths.append(np.nan)
            continue
        ids.append(img["id"])
        names.append(image_path(img, image_root) if image_root is not None else
                     img.get("file_name") or img["coco_url"])
        heights.append(img["height"])
        widths.append(img["width"])
    report.add("invalid_image_record", len(bad), bad)
    # without an image root the files are named in messages but not looked for
    files = names if image_root is not None else [None] * len(ids)
    images = _Images(ids, names, files, np.asarray(heights, np.float64),
                     np.asarray(widths, np.float64))
    _check_duplicates(report, "duplicate_image_id", ids, images.describe, "image")
    return images


def _json_annotations(report, records, images, image_index, known_cats) -> _Annotations:
    a = len(records)
    ann_ids: list = [None] * a
    image_ids: list = [None] * a
    segms: list = [None] * a
    good, rows, cats, bad = [], [], [], []
    # One pass of cheap per-record tests; the numbers inside boxes and polygons, and the
    # geometry, are then checked on arrays.
    for pos, ann in enumerate(records):
        if type(ann) is not dict:
            bad.append((pos, "not an object"))
            continue
        aid, iid, cid, bbox = ann.get("id"), ann.get("image_id"), ann.get("category_id"), \
            ann.get("bbox")
        ann_ids[pos] = aid if _is_int(aid) else None
        image_ids[pos] = iid
        if ann_ids[pos] is None:
            why = f"`id` {aid!r} is not an integer"
        elif not _is_int(iid):
            why = f"`image_id` {iid!r} is not an integer"
        elif not _is_int(cid):
            why = f"`category_id` {cid!r} is not an integer"
        elif not _is_box_like(bbox):
            why = f"`bbox` {_short(bbox, 60)} is not a list of 4 numbers"
        elif "segmentation" not in ann:
            why = "no `segmentation` (LVIS/COCO format requires it; [] for boxes only)"
        else:
            why = _segmentation_problem(ann["segmentation"])
            why = why and f"`segmentation` is {why}"
        if why:
            bad.append((pos, f"{why} (id {aid!r}, image {iid!r})"))
            continue
        good.append(pos)
        rows.append(bbox)
        cats.append(cid)
        segms[pos] = ann["segmentation"]
    box_rows, box_ok = _box_array(rows)
    good, cats = np.asarray(good, np.int64), np.asarray(cats)
    for k in np.flatnonzero(~box_ok):
        pos = int(good[k])
        bad.append((pos, f"`bbox` {_short(rows[k], 60)} is not a list of 4 numbers"))
        segms[pos] = None
    good, cats, box_rows = good[box_ok], cats[box_ok], box_rows[box_ok]
    boxes = np.full((a, 4), np.nan)
    boxes[good] = box_rows
    checked = np.zeros(a, bool)
    checked[good] = True
    image_pos = np.asarray([image_index.get(i, -1) for i in image_ids], np.int64)

    def describe(pos):
        ip = image_pos[pos]
        where = images.describe(ip) if ip >= 0 else f"unknown image {image_ids[pos]!r}"
        return f"annotation {ann_ids[pos]!r} of {where}"

    report.add("invalid_annotation_record", len(bad),
               (f"annotation #{p}: {why}" for p, why in sorted(bad)))
    _check_duplicates(report, "duplicate_annotation_id", ann_ids, describe, "annotation")
    unknown_image = good[image_pos[good] < 0]
    report.add("unknown_image_id", len(unknown_image), (describe(p) for p in unknown_image))
    unknown_cat = np.flatnonzero(~np.isin(cats, np.asarray(sorted(known_cats), np.int64)))
    report.add("unknown_category_id", len(unknown_cat), (
        f"{describe(int(good[k]))}: category_id {int(cats[k])} (categories: "
        f"{_id_range(known_cats)})"
        for k in unknown_cat))
    return _Annotations(describe, image_pos, boxes, checked, segms)


def _id_range(ids) -> str:
    ids = sorted(ids)
    return f"ids {ids[0]}..{ids[-1]}" if ids else "none"


# ---- detectron2 dataset dicts ------------------------------------------------------------------
def check_dataset_dicts(
    dataset_dicts: Sequence[dict],
    thing_classes: Optional[Sequence[str]],
    *,
    name: str = "dataset",
    full: bool = False,
    max_records: int = 5,
    dataset_category_ids: Optional[Iterable[int]] = None,
    workers: Optional[int] = None,
) -> PreflightReport:
    """Check detectron2 dataset dicts (what ``DatasetCatalog.get`` returns).

    Args:
        dataset_dicts: the dicts; annotations with contiguous ``category_id``.
        thing_classes: the class names; category ids must lie in ``[0, len(thing_classes))``.
            None skips that check (with a note).
        name: how the report names the dataset.
        full: also decode every image and compare its size with ``height``/``width``.
        max_records: offending records kept per problem kind.
        dataset_category_ids: the dataset's own category ids, which ``neg_category_ids`` and
            ``not_exhaustive_category_ids`` use (LVIS convention); None skips that check.
        workers: threads decoding images in ``full`` mode.
    """
    started = time.perf_counter()
    report = PreflightReport(name, "full" if full else "cheap", max_records)
    report.num_images = len(dataset_dicts)
    report.num_categories = len(thing_classes) if thing_classes is not None else 0
    num_classes = len(thing_classes) if thing_classes is not None else None
    if thing_classes is None:
        report.notes.append("category ids were not checked: the metadata has no thing_classes")

    ids, files, heights, widths, bad_images = [], [], [], [], []
    for pos, d in enumerate(dataset_dicts):
        f = d.get("file_name") if isinstance(d, dict) else None
        h, w = (d.get("height"), d.get("width")) if isinstance(d, dict) else (None, None)
        why = None
        if not isinstance(d, dict):
            why = "not a dict"
        elif not isinstance(f, str):
            why = f"`file_name` {f!r} is not a string"
        elif (h is not None or w is not None) and not (
                _is_int(h) and h > 0 and _is_int(w) and w > 0):
            why = f"`height` {h!r} / `width` {w!r} are not positive integers"
        elif not isinstance(d.get("annotations", []), list):
            why = "`annotations` is not a list"
        ids.append(d.get("image_id") if isinstance(d, dict) else None)
        files.append(f if isinstance(f, str) else None)
        good_size = why is None and h is not None
        heights.append(h if good_size else np.nan)
        widths.append(w if good_size else np.nan)
        if why is not None:
            bad_images.append((pos, why))
    images = _Images(ids, files, files, np.asarray(heights, np.float64),
                     np.asarray(widths, np.float64))
    report.add("invalid_image_record", len(bad_images),
               (f"{images.describe(p)}: {why}" for p, why in bad_images))
    _check_duplicates(report, "duplicate_image_id", ids, images.describe, "image")
    if dataset_category_ids is not None:
        known = set(dataset_category_ids)
        _check_neg_ids(report, images, [
            (d.get("neg_category_ids", []) or [], d.get("not_exhaustive_category_ids", []) or [])
            if isinstance(d, dict) else () for d in dataset_dicts
        ], known)

    owners, index_in_image, ann_ids, segms = [], [], [], []
    good, rows, modes, cats, bad = [], [], [], [], []
    bad_image_pos = {p for p, _ in bad_images}
    for pos, d in enumerate(dataset_dicts):
        if pos in bad_image_pos:
            continue
        for k, ann in enumerate(d.get("annotations", [])):
            a = len(owners)
            owners.append(pos)
            index_in_image.append(k)
            if not isinstance(ann, dict):
                ann_ids.append(None)
                segms.append(None)
                bad.append((a, "not a dict"))
                continue
            ann_ids.append(ann.get("id"))
            bbox, mode, cid = ann.get("bbox"), ann.get("bbox_mode"), ann.get("category_id")
            segm = ann.get("segmentation")
            # the common case in a few comparisons (this loop runs once per annotation)
            if not (type(bbox) is list and len(bbox) == 4 and type(cid) is int
                    and (mode == BoxMode.XYWH_ABS or mode == BoxMode.XYXY_ABS)
                    and (segm is None or type(segm) is list)):
                why = _dict_annotation_problem(ann)
                if why is not None:
                    segms.append(None)
                    bad.append((a, why))
                    continue
            segms.append(segm)
            good.append(a)
            rows.append(bbox)
            modes.append(mode)
            cats.append(cid)
    report.num_annotations = len(owners)
    box_rows, box_ok = _box_array(rows)
    good, cats = np.asarray(good, np.int64), np.asarray(cats, np.int64)
    for k in np.flatnonzero(~box_ok):
        bad.append((int(good[k]), f"`bbox` {_short(rows[k], 60)} is not 4 numbers"))
        segms[int(good[k])] = None
    xyxy = np.asarray(modes, np.int64)[box_ok] == int(BoxMode.XYXY_ABS)
    good, cats, box_rows = good[box_ok], cats[box_ok], box_rows[box_ok]
    box_rows[xyxy, 2:] -= box_rows[xyxy, :2]  # to XYWH: one convention for the geometry checks
    boxes = np.full((len(owners), 4), np.nan)
    boxes[good] = box_rows
    checked = np.zeros(len(owners), bool)
    checked[good] = True
    image_pos = np.asarray(owners, np.int64)

    def describe(a):
        aid = ann_ids[a]
        which = f"annotation {aid!r}" if aid is not None else f"annotation #{index_in_image[a]}"
        return f"{which} of {images.describe(owners[a])}"

    report.add("invalid_annotation_record", len(bad),
               (f"{describe(a)}: {w}" for a, w in sorted(bad)))
    if any(i is not None for i in ann_ids):
        _check_duplicates(report, "duplicate_annotation_id", ann_ids, describe, "annotation")
    if num_classes is not None:
        unknown_cat = np.flatnonzero((cats < 0) | (cats >= num_classes))
        report.add("unknown_category_id", len(unknown_cat), (
            f"{describe(int(good[k]))}: category_id {int(cats[k])} (contiguous ids "
            f"0..{num_classes - 1} of {num_classes} thing_classes)" for k in unknown_cat))
    anns = _Annotations(describe, image_pos, boxes, checked, segms)
    return _finish(report, images, anns, full, True, workers or _default_workers(), started)


def _dict_annotation_problem(ann: dict) -> Optional[str]:
    if not _is_box_like(ann.get("bbox")):
        return f"`bbox` {_short(ann.get('bbox'), 60)} is not 4 numbers"
    if ann.get("bbox_mode") not in (BoxMode.XYWH_ABS, BoxMode.XYXY_ABS):
        return f"`bbox_mode` {ann.get('bbox_mode')!r} is not XYWH_ABS or XYXY_ABS"
    if not _is_int(ann.get("category_id")):
        return f"`category_id` {ann.get('category_id')!r} is not an integer"
    if "segmentation" in ann:
        problem = _segmentation_problem(ann["segmentation"])
        if problem:
            return f"`segmentation` is {problem}"
    return None


def check_registered_dataset(
    name: str, *, full: bool = False, max_records: int = 5, workers: Optional[int] = None
) -> PreflightReport:
    """Check the dataset registered as ``name`` in detectron2's ``DatasetCatalog``.

    When loading it fails (longtail's loader refuses some problems outright) the error is
    reported, and if the metadata names its json file that json is checked instead, so that the
    report lists every problem rather than the first.
    """
    return _load_and_check(name, full=full, max_records=max_records, workers=workers)[0]


def _load_and_check(
    name: str, *, full: bool, max_records: int = 5, workers: Optional[int] = None
) -> Tuple[PreflightReport, Optional[list]]:
    """:func:`check_registered_dataset`, also returning the loaded dicts (None if loading
    failed), so that training can reuse them instead of loading the dataset again."""
    started = time.perf_counter()
    if name not in DatasetCatalog.list():
        report = PreflightReport(name, "full" if full else "cheap", max_records)
        report.add("dataset_not_loadable", 1, [
            f"no dataset is registered as {name!r}: check the spelling, or register it first "
            "(e.g. longtail.data.register_lvis_style_instances)"])
        return report, None
    meta = MetadataCatalog.get(name)
    try:
        dicts = DatasetCatalog.get(name)
    except Exception as e:  # noqa: BLE001 - whatever the loader raises is the finding
        json_file = getattr(meta, "json_file", None)
        if json_file and os.path.isfile(json_file):
            report = check_lvis_json(json_file, getattr(meta, "image_root", None), full=full,
                                     max_records=max_records, name=name, workers=workers)
            report.notes.append(f"the dataset dicts could not be loaded, so {json_file} was "
                                "checked instead")
        else:
            report = PreflightReport(name, "full" if full else "cheap", max_records)
        report.add("dataset_not_loadable", 1, [f"{type(e).__name__}: {e}"])
        report.seconds = time.perf_counter() - started
        return report, None
    id_map = getattr(meta, "thing_dataset_id_to_contiguous_id", None)
    report = check_dataset_dicts(
        dicts, getattr(meta, "thing_classes", None), name=name, full=full,
        max_records=max_records, dataset_category_ids=list(id_map) if id_map else None,
        workers=workers,
    )
    report.seconds = time.perf_counter() - started  # loading included
    return report, dicts


# ---- training ----------------------------------------------------------------------------------
def preflight_training_datasets(cfg) -> Dict[str, list]:
    """The preflight of every ``DATASETS.TRAIN`` dataset at the start of training
    (``MODEL.LONGTAIL.DATA.PREFLIGHT``: "cheap", "full" or "off").

    The main rank checks and logs the summaries; every rank calls this (the verdict is shared) so
    that all of them stop together on errors.

    Returns:
        The dataset dicts the main rank loaded for the check, by dataset name, for the class
        statistics to reuse (an LVIS train split takes tens of seconds to load); empty on the
        other ranks and when the preflight is off.

    Raises:
        DatasetPreflightError: some dataset has errors; the message shows them and what to run.
    """
    mode = cfg.MODEL.LONGTAIL.DATA.PREFLIGHT
    if mode not in ("cheap", "full", "off"):
        raise ValueError(
            f"MODEL.LONGTAIL.DATA.PREFLIGHT must be 'cheap', 'full' or 'off', got {mode!r}.")
    if mode == "off":
        logger.info("Data preflight is off (MODEL.LONGTAIL.DATA.PREFLIGHT off).")
        return {}
    message = None
    loaded: Dict[str, list] = {}
    if comm.is_main_process():
        failed = []
        for name in cfg.DATASETS.TRAIN:
            report, dicts = _load_and_check(name, full=mode == "full")
            if dicts is not None:
                loaded[name] = dicts
            if not report.ok:
                logger.error("%s", report.summary())
                failed.append(report)
            elif report.warnings:
                logger.warning("%s", report.summary())
            else:
                logger.info("%s", report.summary())
        if failed:
            names = " ".join(f"--dataset {r.dataset}" for r in failed)
            message = (
                "The training data failed the preflight (MODEL.LONGTAIL.DATA.PREFLIGHT "
                f"{mode}); nothing was trained.\n\n"
                + "\n\n".join(r.summary(severities=(ERROR,)) for r in failed)
                + "\n\nFix the data and start again. To see every problem, run\n"
                f"    python -m longtail.tools.check_dataset {names} --max-records 1000\n"
                "(add --full to decode every image too). MODEL.LONGTAIL.DATA.PREFLIGHT off skips "
                "this check."
            )
    if comm.get_world_size() > 1:
        message = comm.all_gather(message)[0]
    if message:
        raise DatasetPreflightError(message)
    return loaded
