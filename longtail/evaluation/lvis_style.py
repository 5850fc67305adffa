"""LVIS-style detection / instance segmentation evaluation, in parity with lvis-api 0.5.3.

The reference protocol is lvis-api 0.5.3 (``LVISResults`` + ``LVISEval``), with the results
preprocessing detectron2 applies before it ("parity recipe", see
``/work/shared/specs/evaluation.md`` sections 1-2):

1. for ``segm``, ignore ``bbox`` so that mask area decides small/medium/large;
2. per image, stable-sort by descending score and keep the first ``max_dets_per_image`` results
   across all classes (ties keep the input order);
3. drop results whose area (box ``w*h`` or RLE mask area) is not in ``(0, inf)``, *after* the cap;
4. drop ground truth with area ``<= 0`` at load;
5. federated filter: a result (I, c) counts only if c has ground truth in image I or is in its
   ``neg_category_ids``; unmatched results of ``not_exhaustive_category_ids`` are ignored;
6. greedy matching per (image, class, area range, IoU threshold), then 101-point interpolated
   precision per (class, area range, IoU threshold).

**AP^fixed** (Dave et al. 2021, "Evaluating large-vocabulary object detectors: the devil is in the
details"; spec section 3) is the same recipe with step 2 replaced: no per-image cap, and per class,
over the whole dataset, the ``max_dets_per_class`` (K = 10,000) highest-scoring results (stable sort,
ties keep the input order). As in lvis-api's ``lvis_challenge_2021`` branch, a per-image cap, when
also given, is applied first, and both caps act before the zero-area drop and the federated filter,
so results those later steps discard still use up slots. See :func:`evaluate_lvis_fixed`.

Implementation. Steps 5-6 used to run on faster-coco-eval's ``COCOeval_faster``, but its Python
side builds a dict entry per (image, class) pair and a dict per result, which made an LVIS-val-size
evaluation (19,800 images x 300 results) take minutes and several GB. Here the results become
numpy columns once, and matching and accumulation are vectorized across (image, class) groups:

* IoU is computed only within (image, class) groups that have ground truth; box IoU with the
  arithmetic of the COCO mask API (bit-identical), mask IoU with faster-coco-eval's RLE API.
* Only result/GT pairs with IoU >= 0.5 (the lowest threshold) can ever match, so the greedy
  matching walks the *candidate* results of all groups at once, one per group per step, for all
  10 IoU thresholds and 4 area ranges together; the scan order, ``>=`` tie rule (the last GT
  with the best IoU wins) and "ignored GTs last" rule are those of lvis-api.
* Accumulation concatenates each class's results in (descending score, image id, input order)
  order, which is lvis-api's stable sort over image-ordered per-image lists, and computes
  precision ``tp / (tp + fp)`` exactly as faster-coco-eval's C++ does (lvis-api adds an epsilon
  of 2.2e-16 to the denominator).

Classes are processed in chunks (``chunk_size``) to bound memory; per-class results are
independent, so the numbers do not depend on the chunking. The summary (step 7 of the spec) is
computed here, the way lvis-api does it.

This module must not import detectron2, so that it can be used on plain json files.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import operator
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from operator import itemgetter
from typing import (
    Any,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import numpy as np
from faster_coco_eval.core import mask as mask_utils

logger = logging.getLogger(__name__)

__all__ = [
    "LVISResult",
    "evaluate_lvis_results",
    "evaluate_lvis_fixed",
    "instance_count_bin",
    "METRIC_KEYS",
    "BIN_KEYS",
]

#: Metric keys always reported (values x100, NaN for an empty group).
METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
#: BAGS-style bins on the training instance count, reported when counts are given.
BIN_KEYS = ("AP1", "AP2", "AP3", "AP4")

# Parameters fixed by the LVIS protocol (identical in lvis-api and faster-coco-eval).
_IOU_THRS = np.linspace(0.5, 0.95, 10)
_NUM_REC_THRS = 101
_REC_THRS = np.linspace(0.0, 1.0, _NUM_REC_THRS)
_AREA_LABELS = ("all", "small", "medium", "large")
# Closed ranges [lo, hi] of lvis-api (1e5 ** 2 = 1e10); a GT of area 1024 is small and medium.
_AREA_RANGES = np.array([[0.0, 1e10], [0.0, 32.0**2], [32.0**2, 96.0**2], [96.0**2, 1e10]])
# lvis-api matches with IoU >= min(t, 1 - 1e-10).
_MATCH_THRS = np.minimum(_IOU_THRS, 1 - 1e-10)
_FREQUENCIES = ("r", "c", "f")
# Upper bounds of bins 1..3 (strict "<"); everything else is bin 4.
_BIN_UPPER_BOUNDS = (10, 100, 1000)


@dataclass
class LVISResult:
    """Outcome of one LVIS-style evaluation.

    Attributes:
        iou_type: "bbox" or "segm".
        metrics: metric name -> value x100 (keys :data:`METRIC_KEYS`, plus :data:`BIN_KEYS` when
            training instance counts were given). NaN when a group or bin has no class with
            validation ground truth.
        per_class: one record per category, sorted by category id, with the fields
            ``id, name, frequency, train_instance_count, train_image_count, bin, num_val_gt,
            num_dets, AP, AP50, AP75, APs, APm, APl``. AP fields are raw (x1) and None when
            undefined (no validation ground truth, or none in that area range).
        precision: float64 array (T=10, R=101, K, A=4); -1 where a class has no ground truth in
            the area range. K follows ``category_ids``.
        recall: float64 array (T=10, K, A=4), -1 likewise.
        category_ids: the K category ids, sorted ascending.
    """

    iou_type: str
    metrics: Dict[str, float]
    per_class: List[Dict[str, Any]]
    precision: np.ndarray
    recall: np.ndarray
    category_ids: List[int] = field(default_factory=list)


def instance_count_bin(count: int) -> int:
    """Return the BAGS bin (1..4) of a class from its training-set instance count.

    Bins are [0, 10), [10, 100), [100, 1000) and [1000, inf); a count of 0 goes to bin 1.

    Args:
        count: number of training instances of the class.

    Returns:
        The bin index, 1 to 4.
    """
    for index, upper in enumerate(_BIN_UPPER_BOUNDS):
        if count < upper:
            return index + 1
    return len(_BIN_UPPER_BOUNDS) + 1


def evaluate_lvis_results(
    gt: Union[str, os.PathLike, Mapping[str, Any]],
    results: Sequence[Mapping[str, Any]],
    iou_type: str,
    max_dets_per_image: int = 300,
    chunk_size: Optional[int] = 50,
    train_instance_count: Optional[Mapping[int, int]] = None,
    train_image_count: Optional[Mapping[int, int]] = None,
    max_dets_per_class: Optional[int] = None,
) -> LVISResult:
    """Evaluate COCO-style results with the LVIS protocol (parity with lvis-api 0.5.3).

    The defaults give the standard LVIS AP (300 results per image). ``max_dets_per_image=-1`` with
    ``max_dets_per_class=K`` gives AP^fixed (see :func:`evaluate_lvis_fixed`).

    Args:
        gt: path of an LVIS-format json, or the already loaded dict (not modified).
        results: list of ``{image_id, category_id, score, bbox [x, y, w, h]}`` dicts, plus
            ``segmentation`` (RLE, or polygons) for ``segm``. Category ids are *dataset* ids.
            The list and its dicts are not modified.
        iou_type: "bbox" or "segm".
        max_dets_per_image: per-image cap across classes (LVIS: 300); negative disables it.
        chunk_size: number of classes evaluated together (memory knob; the numbers do not
            depend on it). None or <= 0 evaluates all classes at once.
        train_instance_count: category id -> number of training instances; enables the bins
            AP1..AP4. Classes missing from the mapping count as 0 (bin 1).
        train_image_count: category id -> number of training images (only reported).
        max_dets_per_class: if given, per class over all images keep only this many
            highest-scoring results (after the per-image cap, before the zero-area drop and the
            federated filter); the number of classes with fewer results is logged. None disables
            it (standard LVIS AP).

    Returns:
        The :class:`LVISResult`.

    Raises:
        ValueError: on an unknown ``iou_type``, a result whose category id or image id is not in
            the ground truth, a result without the field ``iou_type`` needs, or a category
            without an r/c/f ``frequency``.
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    if max_dets_per_class is not None and max_dets_per_class < 1:
        raise ValueError(f"max_dets_per_class must be >= 1 or None, got {max_dets_per_class}")
    start = time.perf_counter()

    gt_dict = _load_gt(gt)
    categories = sorted(gt_dict["categories"], key=lambda c: c["id"])
    cat_ids = [c["id"] for c in categories]
    images = {img["id"]: img for img in gt_dict["images"]}
    _check_frequencies(categories)
    columns = _result_columns(results)
    _check_ids(columns, set(cat_ids), set(images))

    num_val_gt: Dict[int, int] = defaultdict(int)
    for ann in gt_dict["annotations"]:
        num_val_gt[ann["category_id"]] += 1
    if not images:
        logger.warning("The ground truth has no images: every metric is NaN.")
    if len(results) == 0:
        logger.warning(
            "No %s results to evaluate: AP is 0 for classes with ground truth.", iou_type
        )

    # Integer indices: images and categories in ascending id order (lvis-api's order).
    image_ids = np.array(sorted(images), dtype=np.int64)
    cat_id_array = np.array(cat_ids, dtype=np.int64)
    num_cats = len(cat_ids)
    gts = _GroundTruth.build(gt_dict["annotations"], image_ids, cat_id_array, iou_type, images)
    # The GT annotation dicts are no longer needed (a loaded LVIS val json is ~0.4 GB of them).
    del gt_dict
    positives = np.unique(gts.image * num_cats + gts.category)
    negatives = _image_class_keys(images, image_ids, cat_id_array, "neg_category_ids")
    not_exhaustive_keys = _image_class_keys(
        images, image_ids, cat_id_array, "not_exhaustive_category_ids"
    )

    det_image = np.searchsorted(image_ids, columns.image_id)
    det_cat = np.searchsorted(cat_id_array, columns.category_id)
    score = columns.score
    # At LVIS-val size every per-result array is ~48 MB: free them as soon as possible.
    del columns
    kept = _cap_per_image(det_image, score, max_dets_per_image, len(image_ids))
    if max_dets_per_class is not None:
        kept = _cap_per_class(
            kept,
            det_image,
            det_cat,
            score,
            max_dets_per_class,
            max_dets_per_image >= 0,
            cat_ids,
            iou_type,
        )
    _check_geometry_field(results, kept, iou_type)
    # Federated filter: keep (I, c) if c has (loaded) GT in I or is in neg_category_ids of I.
    # Applied before the zero-area drop, which commutes with it, so that geometry is read only
    # for results that can count. From here on only the set of kept results matters (module
    # docstring), not their order.
    pair_key = det_image[kept] * num_cats + det_cat[kept]
    allowed = np.isin(pair_key, positives) | np.isin(pair_key, negatives)
    kept, pair_key = kept[allowed], pair_key[allowed]
    geometry, area = _geometry(results, kept, iou_type, images, image_ids[det_image[kept]])
    valid = np.flatnonzero((area > 0) & (area < math.inf))
    if len(valid) < len(kept):
        logger.info(
            "Dropped %d %s results with zero area (of those the federated filter keeps).",
            len(kept) - len(valid),
            iou_type,
        )
    kept, pair_key = kept[valid], pair_key[valid]
    dets = _Detections(
        image=det_image[kept],
        category=det_cat[kept],
        score=score[kept],
        area=area[valid],
        index=kept,
        not_exhaustive=np.isin(pair_key, not_exhaustive_keys),
        geometry=_select(geometry, valid),
    )
    del det_image, det_cat, score, geometry, area, kept, pair_key
    dets.sort_for_accumulation()
    num_dets_by_index = np.bincount(dets.category, minlength=num_cats)
    num_dets = {cat_id: int(n) for cat_id, n in zip(cat_ids, num_dets_by_index) if n}

    if chunk_size is None or chunk_size <= 0:
        chunk_size = max(1, num_cats)
    precision = -np.ones((len(_IOU_THRS), _NUM_REC_THRS, num_cats, len(_AREA_LABELS)))
    recall = -np.ones((len(_IOU_THRS), num_cats, len(_AREA_LABELS)))
    det_bounds = np.searchsorted(dets.category, np.arange(num_cats + 1))
    gt_bounds = np.searchsorted(gts.category, np.arange(num_cats + 1))
    for begin in range(0, num_cats, chunk_size):
        end = min(begin + chunk_size, num_cats)
        chunk_dets = dets.slice(det_bounds[begin], det_bounds[end])
        chunk_gts = gts.slice(gt_bounds[begin], gt_bounds[end])
        _evaluate_chunk(
            chunk_dets, chunk_gts, begin, end, len(image_ids), iou_type, precision, recall
        )

    metrics = _summarize(precision, categories, train_instance_count)
    per_class = _per_class_records(
        precision,
        categories,
        num_val_gt,
        num_dets,
        train_instance_count,
        train_image_count,
    )
    logger.info(
        "LVIS %s%s evaluation of %d results on %d images, %d classes: %.2f s",
        iou_type,
        "" if max_dets_per_class is None else f" AP^fixed (top {max_dets_per_class} per class)",
        len(results),
        len(images),
        len(cat_ids),
        time.perf_counter() - start,
    )
    return LVISResult(iou_type, metrics, per_class, precision, recall, cat_ids)


def evaluate_lvis_fixed(
    gt: Union[str, os.PathLike, Mapping[str, Any]],
    results: Sequence[Mapping[str, Any]],
    iou_type: str,
    topk: int = 10000,
    **kwargs: Any,
) -> LVISResult:
    """AP^fixed (Dave et al. 2021): no per-image cap, the ``topk`` best results of every class.

    Everything else is the standard LVIS protocol (federated filter, not-exhaustive classes,
    zero-area drop, areas, IoU and recall thresholds, r/c/f groups), so the metric keys are the
    standard ones. Results produced with a per-image cap at inference (detectron2's
    ``TEST.DETECTIONS_PER_IMAGE``) give a lower bound; the number of classes with fewer than
    ``topk`` results is logged.

    Args:
        gt, results, iou_type: as in :func:`evaluate_lvis_results`.
        topk: results kept per class over the whole dataset (the paper's K = 10,000).
        **kwargs: ``chunk_size``, ``train_instance_count``, ``train_image_count`` of
            :func:`evaluate_lvis_results`.

    Returns:
        The :class:`LVISResult`.
    """
    for key in ("max_dets_per_image", "max_dets_per_class"):
        if key in kwargs:
            raise TypeError(f"evaluate_lvis_fixed() sets {key} itself")
    return evaluate_lvis_results(
        gt, results, iou_type, max_dets_per_image=-1, max_dets_per_class=topk, **kwargs
    )


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _load_gt(gt: Union[str, os.PathLike, Mapping[str, Any]]) -> Dict[str, Any]:
    """Load the GT and return a shallow view without area <= 0 annotations.

    Nothing is written into the annotation dicts, so they are shared with the caller's GT, not
    copied. ``iscrowd`` is not read: lvis-api ignores it.
    """
    if isinstance(gt, (str, os.PathLike)):
        with open(gt) as f:
            source = json.load(f)
    else:
        source = gt
    annotations = []
    dropped = 0
    for ann in source.get("annotations", []):
        # lvis-api loads annotations with 0 < area < inf; others neither count nor make the class
        # present in the image.
        if not 0 < ann["area"] < math.inf:
            dropped += 1
            continue
        annotations.append(ann)
    if dropped:
        logger.warning("Dropped %d ground-truth annotations with area <= 0.", dropped)
    return {
        "annotations": annotations,
        "images": list(source.get("images", [])),
        "categories": list(source.get("categories", [])),
    }


def _check_frequencies(categories: Iterable[Mapping[str, Any]]) -> None:
    """Raise if a category lacks an r/c/f frequency."""
    bad = [c["id"] for c in categories if c.get("frequency") not in _FREQUENCIES]
    if bad:
        raise ValueError(
            f"Categories {_preview(bad)} have no 'frequency' in {_FREQUENCIES}; check that the "
            "ground truth is an LVIS-format json."
        )


@dataclass
class _Columns:
    """``image_id``, ``category_id`` and ``score`` of every result, as arrays (input order)."""

    image_id: np.ndarray
    category_id: np.ndarray
    score: np.ndarray


def _result_columns(results: Sequence[Mapping[str, Any]]) -> _Columns:
    """Read the three scalar fields of every result (one pass per field, no per-result copy)."""
    n = len(results)
    return _Columns(
        image_id=np.fromiter(map(itemgetter("image_id"), results), np.int64, n),
        category_id=np.fromiter(map(itemgetter("category_id"), results), np.int64, n),
        score=np.fromiter(map(itemgetter("score"), results), np.float64, n),
    )


def _check_ids(columns: _Columns, cat_ids: set, img_ids: set) -> None:
    """Raise a ValueError naming result category / image ids unknown to the ground truth."""
    bad_cats = sorted(set(np.unique(columns.category_id).tolist()) - cat_ids)
    if bad_cats:
        raise ValueError(
            f"Results contain category ids not in the ground truth: {_preview(bad_cats)}. Check "
            "that results use dataset category ids (not contiguous 0-based indices) and that they "
            "were made for this annotation file."
        )
    bad_imgs = sorted(set(np.unique(columns.image_id).tolist()) - img_ids)
    if bad_imgs:
        raise ValueError(
            f"Results contain image ids not in the ground truth: {_preview(bad_imgs)}. Check that "
            "the results were produced on the dataset split of this annotation file."
        )


def _preview(ids: Sequence[Any], limit: int = 20) -> str:
    """Format at most ``limit`` ids for an error message."""
    shown = ", ".join(str(i) for i in ids[:limit])
    more = f", ... ({len(ids)} in total)" if len(ids) > limit else ""
    return f"[{shown}{more}]"


def _image_class_keys(
    images: Mapping[int, Mapping[str, Any]],
    image_ids: np.ndarray,
    cat_ids: np.ndarray,
    field_name: str,
) -> np.ndarray:
    """``image index * K + class index`` of every (image, class) listed in an image field.

    Ids not in the ground truth's categories are skipped (no result can have them).
    """
    img_col, cat_col = [], []
    for index, img_id in enumerate(image_ids.tolist()):
        listed = images[img_id].get(field_name) or ()
        img_col.extend([index] * len(listed))
        cat_col.extend(listed)
    cats = np.asarray(cat_col, dtype=np.int64)
    pos = np.searchsorted(cat_ids, cats)
    known = pos < len(cat_ids)
    known[known] = cat_ids[pos[known]] == cats[known]
    return np.asarray(img_col, dtype=np.int64)[known] * len(cat_ids) + pos[known]


# --------------------------------------------------------------------------------------------
# Caps (which results are kept)
# --------------------------------------------------------------------------------------------


def _cap_per_image(
    image: np.ndarray, score: np.ndarray, max_dets: int, num_images: int
) -> np.ndarray:
    """Keep the ``max_dets`` highest-scoring results of every image, across classes.

    lvis-api's ``limit_dets_per_image``: in an image with more than ``max_dets`` results, a stable
    sort by descending score (ties keep the input order) decides which stay.

    Args:
        image: image index of every result (input order).
        score: score of every result.
        max_dets: the cap; negative disables it.
        num_images: number of images (bound of ``image``).

    Returns:
        Indices of the kept results, ascending.
    """
    n = len(image)
    if max_dets < 0:
        return np.arange(n)
    over = np.bincount(image, minlength=num_images) > max_dets
    crowded = np.flatnonzero(over[image])
    if len(crowded) == 0:
        return np.arange(n)
    # Only the results of images over the cap need sorting (usually none or few).
    order = crowded[np.lexsort((crowded, -score[crowded], image[crowded]))]
    group = image[order]
    rank = np.arange(len(order)) - np.searchsorted(group, group)
    kept = np.concatenate([np.flatnonzero(~over[image]), order[rank < max_dets]])
    kept.sort()
    return kept


def _cap_per_class(
    kept: np.ndarray,
    image: np.ndarray,
    category: np.ndarray,
    score: np.ndarray,
    max_dets: int,
    per_image_cap: bool,
    cat_ids: Sequence[int],
    iou_type: str,
) -> np.ndarray:
    """Keep the ``max_dets`` highest-scoring results of every class over the whole dataset.

    A stable sort by descending score over the results in the order lvis-api's per-image cap
    leaves them in. That order groups the results by image, images in order of first appearance
    (capped images sorted by score, ties in input order); results of tied score therefore rank
    by (first appearance of their image, input position). Without the per-image cap lvis-api does
    not regroup, and ties rank by input position alone. Logs how many classes have fewer than
    ``max_dets`` results: with results from capped inference their AP^fixed is a lower bound.

    Args:
        kept: indices of the results left by the per-image cap.
        image, category, score: image index, class index and score of every result.
        max_dets: K, the per-class cap.
        per_image_cap: whether the per-image cap was applied (it decides the tie order).
        cat_ids: every category id of the ground truth (for the log message).
        iou_type: "bbox" or "segm" (for the log message).

    Returns:
        Indices of the kept results, ascending.
    """
    cats = category[kept]
    counts = np.bincount(cats, minlength=len(cat_ids))
    if per_image_cap:
        _, first_index, inverse = np.unique(image, return_index=True, return_inverse=True)
        appearance = first_index[inverse][kept]
    else:
        appearance = np.zeros(len(kept), dtype=np.int64)
    order = np.lexsort((kept, appearance, -score[kept], cats))
    group = cats[order]
    rank = np.arange(len(kept)) - np.searchsorted(group, group)
    result = np.sort(kept[order[rank < max_dets]])

    short = int((counts < max_dets).sum())
    if short:
        logger.warning(
            "AP^fixed (%s): %d of %d classes have fewer than %d results (%d have none). If "
            "inference capped the detections per image (TEST.DETECTIONS_PER_IMAGE >= 0), their "
            "AP^fixed is a lower bound: run inference with TEST.DETECTIONS_PER_IMAGE -1.",
            iou_type,
            short,
            len(cat_ids),
            max_dets,
            int((counts == 0).sum()),
        )
    else:
        logger.info(
            "AP^fixed (%s): every one of the %d classes has at least %d result(s).",
            iou_type,
            len(cat_ids),
            max_dets,
        )
    return result


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def _iter_selected(
    results: Sequence[Mapping[str, Any]], index: np.ndarray, block: int = 1 << 18
) -> Iterator[Mapping[str, Any]]:
    """``results[i] for i in index``, converting the indices to Python ints a block at a time
    (a full ``index.tolist()`` costs ~36 bytes per result)."""
    for begin in range(0, len(index), block):
        yield from map(results.__getitem__, index[begin : begin + block].tolist())


def _check_geometry_field(
    results: Sequence[Mapping[str, Any]], kept: np.ndarray, iou_type: str
) -> None:
    """Raise a ValueError if a result left by the caps lacks the field ``iou_type`` needs."""
    field_name = "bbox" if iou_type == "bbox" else "segmentation"
    present = sum(
        map(operator.contains, _iter_selected(results, kept), itertools.repeat(field_name))
    )
    missing = len(kept) - present
    if missing:
        raise ValueError(f"{missing} results have no '{field_name}', needed for {iou_type} eval.")


def _geometry(
    results: Sequence[Mapping[str, Any]],
    kept: np.ndarray,
    iou_type: str,
    images: Mapping[int, Mapping[str, Any]],
    kept_image_ids: np.ndarray,
) -> Tuple[Union[np.ndarray, List[Dict[str, Any]]], np.ndarray]:
    """Boxes (n, 4) or compressed RLEs of the kept results, and their areas.

    For ``bbox`` the area is the box area ``w * h``; for ``segm`` it is the mask area and ``bbox``
    is not read (detectron2 drops it before lvis-api, so mask area decides s/m/l).
    """
    if iou_type == "bbox":
        selected = _iter_selected(results, kept)
        flat = np.fromiter(
            itertools.chain.from_iterable(map(itemgetter("bbox"), selected)), np.float64
        )
        if flat.size != 4 * len(kept):
            raise ValueError("Every result 'bbox' must be [x, y, w, h].")
        boxes = flat.reshape(-1, 4)
        return boxes, boxes[:, 2] * boxes[:, 3]
    rles = [
        _to_compressed_rle(res["segmentation"], images[img_id])
        for res, img_id in zip(_iter_selected(results, kept), kept_image_ids.tolist())
    ]
    areas = np.asarray(mask_utils.area(rles), dtype=np.float64) if rles else np.zeros(0)
    return rles, areas


def _to_compressed_rle(segmentation: Any, image: Mapping[str, Any]) -> Dict[str, Any]:
    """A compressed RLE dict for a result or GT segmentation (the input is never modified).

    Args:
        segmentation: compressed RLE (``counts`` str/bytes, returned as is), uncompressed RLE
            (``counts`` list) or a list of polygons.
        image: the GT image record, for height and width of polygons.
    """
    if isinstance(segmentation, dict) and not isinstance(segmentation["counts"], list):
        return segmentation
    if isinstance(segmentation, dict):
        height, width = segmentation["size"]
        return mask_utils.frPyObjects(segmentation, height, width)
    rles = mask_utils.frPyObjects(segmentation, image["height"], image["width"])
    # Merging a single RLE returns it unchanged; skipping the call saves most of the GT
    # conversion time (80 % of LVIS polygons are single-part).
    return rles[0] if len(rles) == 1 else mask_utils.merge(rles)


def _select(geometry: Union[np.ndarray, List[Any]], index: np.ndarray):
    """``geometry[index]`` for a box array or a list of RLEs."""
    if isinstance(geometry, np.ndarray):
        return geometry[index]
    return [geometry[i] for i in index.tolist()]


@dataclass
class _Detections:
    """The results that take part in the evaluation, as columns."""

    image: np.ndarray  # image index (ascending image id order)
    category: np.ndarray  # class index (ascending category id order)
    score: np.ndarray
    area: np.ndarray  # box or mask area (decides the area range of unmatched results)
    index: np.ndarray  # position in the caller's list: breaks score ties
    not_exhaustive: np.ndarray  # class is in the image's not_exhaustive_category_ids
    geometry: Union[np.ndarray, List[Any]]  # boxes (n, 4) or compressed RLEs

    def sort_for_accumulation(self) -> None:
        """Sort (in place) by class, descending score, image, input position.

        Per class this is lvis-api's accumulation order (per-image lists concatenated in image id
        order, each in stable score order, then a stable sort by descending score), and per
        (image, class) it is its matching order.
        """
        order = np.lexsort((self.index, self.image, -self.score, self.category))
        # One column at a time, so that only one old column is alive next to its sorted copy.
        for name in ("image", "category", "score", "area", "index", "not_exhaustive"):
            setattr(self, name, getattr(self, name)[order])
        self.geometry = _select(self.geometry, order)

    def slice(self, begin: int, end: int) -> "_Detections":
        return _Detections(
            self.image[begin:end],
            self.category[begin:end],
            self.score[begin:end],
            self.area[begin:end],
            self.index[begin:end],
            self.not_exhaustive[begin:end],
            self.geometry[begin:end],
        )


@dataclass
class _GroundTruth:
    """Loaded GT of known images and classes, sorted by (class, image, json order)."""

    image: np.ndarray
    category: np.ndarray
    area: np.ndarray
    geometry: Union[np.ndarray, List[Any]]  # boxes (n, 4), or segmentations (RLE'd per chunk)
    image_records: List[Mapping[str, Any]]  # for the mask size of polygons

    @staticmethod
    def build(
        annotations: Sequence[Mapping[str, Any]],
        image_ids: np.ndarray,
        cat_ids: np.ndarray,
        iou_type: str,
        images: Mapping[int, Mapping[str, Any]],
    ) -> "_GroundTruth":
        n = len(annotations)
        img = np.fromiter(map(itemgetter("image_id"), annotations), np.int64, n)
        cat = np.fromiter(map(itemgetter("category_id"), annotations), np.int64, n)
        img_index = np.minimum(np.searchsorted(image_ids, img), max(len(image_ids) - 1, 0))
        cat_index = np.minimum(np.searchsorted(cat_ids, cat), max(len(cat_ids) - 1, 0))
        # lvis-api evaluates only the GT of the listed images and categories.
        known = np.zeros(n, dtype=bool)
        if len(image_ids) and len(cat_ids):
            known = (image_ids[img_index] == img) & (cat_ids[cat_index] == cat)
        # Stable: (image, class) groups keep the json order, which is lvis-api's GT order.
        order = np.flatnonzero(known)
        order = order[np.lexsort((img_index[order], cat_index[order]))]
        area = np.fromiter(map(itemgetter("area"), annotations), np.float64, n)[order]
        anns = [annotations[i] for i in order.tolist()]
        if iou_type == "bbox":
            geometry: Union[np.ndarray, List[Any]] = np.array(
                [ann["bbox"] for ann in anns], dtype=np.float64
            ).reshape(-1, 4)
        else:
            geometry = [ann["segmentation"] for ann in anns]
        records = [images[ann["image_id"]] for ann in anns]
        return _GroundTruth(img_index[order], cat_index[order], area, geometry, records)

    def slice(self, begin: int, end: int) -> "_GroundTruth":
        return _GroundTruth(
            self.image[begin:end],
            self.category[begin:end],
            self.area[begin:end],
            self.geometry[begin:end],
            self.image_records[begin:end],
        )


# --------------------------------------------------------------------------------------------
# Matching and accumulation
# --------------------------------------------------------------------------------------------


def _evaluate_chunk(
    dets: _Detections,
    gts: _GroundTruth,
    begin: int,
    end: int,
    num_images: int,
    iou_type: str,
    precision: np.ndarray,
    recall: np.ndarray,
) -> None:
    """Evaluate classes ``begin..end-1`` and write their slices of ``precision`` / ``recall``.

    Args:
        dets: the chunk's results, sorted by :meth:`_Detections.sort_for_accumulation`.
        gts: the chunk's GT, sorted by (class, image, json order).
        begin, end: class index range of the chunk.
        num_images: number of images (for the (image, class) group keys).
        iou_type: "bbox" or "segm".
        precision: (T, R, K, A) output, -1 where a class has no GT in an area range.
        recall: (T, K, A) output.
    """
    num_t, num_a = len(_IOU_THRS), len(_AREA_LABELS)
    lo, hi = _AREA_RANGES[:, 0:1], _AREA_RANGES[:, 1:2]
    # (A, n): GT outside the area range is ignored; so is an unmatched result outside it.
    gt_ignored = (gts.area[None, :] < lo) | (gts.area[None, :] > hi)
    det_outside = (dets.area[None, :] < lo) | (dets.area[None, :] > hi)
    matched, matched_ignored = _match(dets, gts, gt_ignored, num_images, iou_type)
    # (T, A, n) outcome of every result; ignored ones are neither TP nor FP.
    unmatched_ignored = det_outside | dets.not_exhaustive[None, :]
    tp = matched & ~matched_ignored
    fp = ~matched & ~unmatched_ignored[None, :, :]

    num_classes = end - begin
    local_gt = gts.category - begin
    num_gt = np.zeros((num_classes, num_a), dtype=np.int64)
    for a in range(num_a):
        num_gt[:, a] = np.bincount(local_gt[~gt_ignored[a]], minlength=num_classes)
    bounds = np.searchsorted(dets.category, np.arange(begin, end + 1))
    for k in range(num_classes):
        if not num_gt[k].any():
            continue  # no GT: stays -1 ("absent"), as in lvis-api
        s0, s1 = bounds[k], bounds[k + 1]
        prec_k, rec_k = _accumulate_class(
            tp[:, :, s0:s1].reshape(num_t * num_a, s1 - s0),
            fp[:, :, s0:s1].reshape(num_t * num_a, s1 - s0),
            np.tile(num_gt[k], num_t),
        )
        precision[:, :, begin + k, :] = prec_k.reshape(num_t, num_a, -1).transpose(0, 2, 1)
        recall[:, begin + k, :] = rec_k.reshape(num_t, num_a)


def _accumulate_class(
    tp: np.ndarray, fp: np.ndarray, num_gt: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """Interpolated precision at the 101 recall thresholds for one class.

    Args:
        tp, fp: (rows, n) booleans of the class's results in accumulation order, one row per
            (IoU threshold, area range).
        num_gt: (rows,) non-ignored GT count of each row.

    Returns:
        precision (rows, R) and recall (rows,); -1 in rows without GT.
    """
    rows, n = tp.shape
    precision = -np.ones((rows, _NUM_REC_THRS))
    recall = -np.ones(rows)
    has_gt = num_gt > 0
    if n == 0:
        precision[has_gt] = 0.0
        recall[has_gt] = 0.0
        return precision, recall
    tp_sum = np.cumsum(tp, axis=1)
    fp_sum = np.cumsum(fp, axis=1)
    denom = tp_sum + fp_sum
    # faster-coco-eval's C++ arithmetic: tp / (tp + fp) in double, 0 before the first valid one.
    prec = np.divide(tp_sum, denom, out=np.zeros((rows, n)), where=denom > 0)
    # Precision envelope: running maximum from the right.
    prec = np.maximum.accumulate(prec[:, ::-1], axis=1)[:, ::-1]
    # rec = tp_sum / n_gt is non-decreasing in tp_sum, so "first index with rec >= r" is "first
    # index with tp_sum >= c_r", c_r the least count whose rec reaches r. The doubles compared
    # are exactly lvis-api's (c / n_gt against the linspace thresholds); the integer search then
    # runs over all rows at once, each row shifted by its own offset.
    needed = np.zeros((rows, _NUM_REC_THRS), dtype=np.int64)
    for n_gt in np.unique(num_gt[has_gt]).tolist():
        counts_needed = np.searchsorted(np.arange(n_gt + 1) / n_gt, _REC_THRS, side="left")
        needed[num_gt == n_gt] = counts_needed
    offset = np.arange(rows, dtype=np.int64) * (int(num_gt.max()) + 2)
    flat = (tp_sum + offset[:, None]).ravel()
    index = np.searchsorted(flat, (needed + offset[:, None]).ravel(), side="left")
    index = index.reshape(rows, _NUM_REC_THRS) - (np.arange(rows) * n)[:, None]
    found = index < n
    values = np.take_along_axis(prec, np.minimum(index, n - 1), axis=1)
    precision[has_gt] = np.where(found, values, 0.0)[has_gt]
    recall[has_gt] = tp_sum[has_gt, -1] / num_gt[has_gt]
    return precision, recall


def _match(
    dets: _Detections,
    gts: _GroundTruth,
    gt_ignored: np.ndarray,
    num_images: int,
    iou_type: str,
) -> Tuple[np.ndarray, np.ndarray]:
    """Greedy LVIS matching of every result, for every IoU threshold and area range at once.

    Args:
        dets: results sorted by :meth:`_Detections.sort_for_accumulation`.
        gts: GT sorted by (class, image, json order).
        gt_ignored: (A, num GT) area-range ignore flags.
        num_images: number of images (group keys).
        iou_type: "bbox" or "segm".

    Returns:
        matched (T, A, n) and matched_ignored (T, A, n): whether each result is matched, and
        whether its GT is an ignored one (then the result is ignored too).
    """
    num_t, num_a = len(_IOU_THRS), len(_AREA_LABELS)
    matched = np.zeros((num_t * num_a, len(dets.score)), dtype=bool)
    matched_ignored = np.zeros_like(matched)
    shape = (num_t, num_a, len(dets.score))
    if len(gts.area) == 0 or len(dets.score) == 0:
        return matched.reshape(shape), matched_ignored.reshape(shape)

    gt_key = gts.category * num_images + gts.image
    group_keys, group_start, group_size = np.unique(gt_key, return_index=True, return_counts=True)
    det_key = dets.category * num_images + dets.image
    # Results of groups with GT, in matching order: per group descending score, ties in input
    # order (the accumulation order already is, within a group).
    positive = np.flatnonzero(np.isin(det_key, group_keys))
    positive = positive[np.argsort(det_key[positive], kind="stable")]
    if len(positive) == 0:
        return matched.reshape(shape), matched_ignored.reshape(shape)
    group = np.searchsorted(group_keys, det_key[positive])

    pair_det, pair_gt, iou = _pair_ious(
        dets, gts, positive, group, group_start, group_size, iou_type
    )
    # A pair below the lowest threshold can never match: only candidates take part.
    candidate = iou >= _MATCH_THRS[0]
    pair_det, pair_gt, iou = pair_det[candidate], pair_gt[candidate], iou[candidate]
    if len(iou) == 0:
        return matched.reshape(shape), matched_ignored.reshape(shape)
    # Rank of each candidate result within its group (pairs are result-major, results in
    # matching order, GT in json order).
    new_det = np.ones(len(pair_det), dtype=bool)
    new_det[1:] = pair_det[1:] != pair_det[:-1]
    cand_dets = pair_det[new_det]
    cand_group = group[cand_dets]
    group_begins = np.searchsorted(cand_group, cand_group)
    rank = np.arange(len(cand_dets)) - group_begins
    pair_rank = np.repeat(rank, np.diff(np.append(np.flatnonzero(new_det), len(pair_det))))
    step_order = np.argsort(pair_rank, kind="stable")
    pair_det, pair_gt, iou, pair_rank = (a[step_order] for a in (pair_det, pair_gt, iou, pair_rank))
    steps = np.searchsorted(pair_rank, np.arange(pair_rank[-1] + 2))

    thresholds = np.repeat(_MATCH_THRS, num_a)[:, None]  # rows: t * A + a
    ignored_rows = np.tile(gt_ignored, (num_t, 1))
    gt_taken = np.zeros((num_t * num_a, len(gts.area)), dtype=bool)
    for s in range(len(steps) - 1):
        b0, b1 = steps[s], steps[s + 1]
        s_det, s_gt, s_iou = pair_det[b0:b1], pair_gt[b0:b1], iou[b0:b1]
        # One segment per result (each result's pairs are contiguous).
        seg_begin = np.flatnonzero(np.append(True, s_det[1:] != s_det[:-1]))
        seg_of_pair = np.cumsum(np.append(True, s_det[1:] != s_det[:-1])) - 1
        usable = ~gt_taken[:, s_gt] & (s_iou[None, :] >= thresholds)
        ignored = ignored_rows[:, s_gt]
        # lvis-api scans non-ignored GT first and stops at the first ignored one once it holds a
        # non-ignored match; only without one does an ignored GT get matched.
        first = _segment_last_argmax(
            np.where(usable & ~ignored, s_iou, -1.0), seg_begin, seg_of_pair
        )
        second = _segment_last_argmax(
            np.where(usable & ignored, s_iou, -1.0), seg_begin, seg_of_pair
        )
        choice = np.where(first >= 0, first, second)
        rows, segs = np.nonzero(choice >= 0)
        gt_taken[rows, s_gt[choice[rows, segs]]] = True
        det_local = positive[s_det[seg_begin[segs]]]
        matched[rows, det_local] = True
        matched_ignored[rows, det_local] = first[rows, segs] < 0
    return matched.reshape(shape), matched_ignored.reshape(shape)


def _segment_last_argmax(
    values: np.ndarray, seg_begin: np.ndarray, seg_of_pair: np.ndarray
) -> np.ndarray:
    """Per row and segment, the position of the *last* maximum of ``values`` (>= 0), or -1.

    lvis-api takes a GT when its IoU is ``>=`` the best so far, so among equal IoUs the last one
    in scan order wins.
    """
    best = np.maximum.reduceat(values, seg_begin, axis=1)
    hit = (values >= 0) & (values == best[:, seg_of_pair])
    position = np.where(hit, np.arange(values.shape[1]), -1)
    return np.maximum.reduceat(position, seg_begin, axis=1)


def _pair_ious(
    dets: _Detections,
    gts: _GroundTruth,
    positive: np.ndarray,
    group: np.ndarray,
    group_start: np.ndarray,
    group_size: np.ndarray,
    iou_type: str,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every (result, GT) pair within the (image, class) groups.

    Args:
        dets, gts: as in :func:`_match`.
        positive: indices of the results that have GT in their group, in matching order.
        group: group index of each of them (non-decreasing).
        group_start, group_size: GT range of each group.
        iou_type: "bbox" or "segm".

    Returns:
        pair_det (index into ``positive``), pair_gt (GT index) and IoU, result-major, GT in json
        order within a result.
    """
    sizes = group_size[group]
    total = int(sizes.sum())
    pair_det = np.repeat(np.arange(len(positive)), sizes)
    first_pair = np.cumsum(sizes) - sizes
    pair_gt = np.repeat(group_start[group] - first_pair, sizes) + np.arange(total)
    if iou_type == "bbox":
        return pair_det, pair_gt, _box_iou(dets.geometry[positive][pair_det], gts.geometry[pair_gt])

    iou = np.empty(total)
    gt_rles = _gt_rles(gts)
    det_bounds = np.flatnonzero(np.append(True, group[1:] != group[:-1]))
    det_bounds = np.append(det_bounds, len(group))
    for d0, d1 in zip(det_bounds[:-1].tolist(), det_bounds[1:].tolist()):
        g = group[d0]
        g0, size = int(group_start[g]), int(group_size[g])
        ious = mask_utils.iou(
            [dets.geometry[i] for i in positive[d0:d1].tolist()],
            gt_rles[g0 : g0 + size],
            [0] * size,
        )
        iou[first_pair[d0] : first_pair[d0] + (d1 - d0) * size] = np.asarray(ious).ravel()
    return pair_det, pair_gt, iou


def _box_iou(det: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Elementwise IoU of (n, 4) boxes [x, y, w, h], no crowd.

    The same operations in the same order as the COCO mask API's ``bbIou`` (pycocotools and
    faster-coco-eval), so the values are bit-identical to what lvis-api compares with the
    thresholds.
    """
    dx, dy, dw, dh = det.T
    gx, gy, gw, gh = gt.T
    w = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)
    h = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
    inter = np.where(w <= 0, 0.0, w) * np.where(h <= 0, 0.0, h)
    return inter / (dw * dh + gw * gh - inter)


def _gt_rles(gts: _GroundTruth) -> List[Dict[str, Any]]:
    """Compressed RLEs of the GT segmentations (polygons are merged at the image size)."""
    return [
        _to_compressed_rle(segmentation, image)
        for segmentation, image in zip(gts.geometry, gts.image_records)
    ]


def _mean_valid(values: np.ndarray) -> float:
    """Mean of the entries > -1 (lvis-api's summary), NaN when there are none."""
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else float("nan")


def _summarize(
    precision: np.ndarray,
    categories: Sequence[Mapping[str, Any]],
    train_instance_count: Optional[Mapping[int, int]],
) -> Dict[str, float]:
    """Compute the reported metrics (x100) from precision (T, R, K, A)."""
    t50 = int(np.argmin(np.abs(_IOU_THRS - 0.5)))
    t75 = int(np.argmin(np.abs(_IOU_THRS - 0.75)))
    raw = {
        "AP": _mean_valid(precision[:, :, :, 0]),
        "AP50": _mean_valid(precision[t50, :, :, 0]),
        "AP75": _mean_valid(precision[t75, :, :, 0]),
        "APs": _mean_valid(precision[:, :, :, 1]),
        "APm": _mean_valid(precision[:, :, :, 2]),
        "APl": _mean_valid(precision[:, :, :, 3]),
    }
    for freq in _FREQUENCIES:
        ks = [k for k, c in enumerate(categories) if c.get("frequency") == freq]
        raw["AP" + freq] = _mean_valid(precision[:, :, ks, 0])
    if train_instance_count is not None:
        bins = _bins(categories, train_instance_count)
        for b, key in enumerate(BIN_KEYS, start=1):
            ks = [k for k, cat_bin in enumerate(bins) if cat_bin == b]
            raw[key] = _mean_valid(precision[:, :, ks, 0])
    return {key: 100.0 * value for key, value in raw.items()}


def _bins(
    categories: Sequence[Mapping[str, Any]], train_instance_count: Mapping[int, int]
) -> List[int]:
    """Bin (1..4) of every category, in ``categories`` order."""
    missing = [c["id"] for c in categories if c["id"] not in train_instance_count]
    if missing:
        logger.warning(
            "%d classes have no training instance count (bin 1): %s",
            len(missing),
            _preview(missing),
        )
    return [instance_count_bin(train_instance_count.get(c["id"], 0)) for c in categories]


def _per_class_records(
    precision: np.ndarray,
    categories: Sequence[Mapping[str, Any]],
    num_val_gt: Mapping[int, int],
    num_dets: Mapping[int, int],
    train_instance_count: Optional[Mapping[int, int]],
    train_image_count: Optional[Mapping[int, int]],
) -> List[Dict[str, Any]]:
    """One json-serializable record per category (spec section 4), AP fields raw (x1)."""
    t50 = int(np.argmin(np.abs(_IOU_THRS - 0.5)))
    t75 = int(np.argmin(np.abs(_IOU_THRS - 0.75)))
    bins = _bins(categories, train_instance_count) if train_instance_count is not None else None

    def value(values: np.ndarray, has_gt: bool) -> Optional[float]:
        mean = _mean_valid(values) if has_gt else float("nan")
        return None if math.isnan(mean) else mean

    records = []
    for k, cat in enumerate(categories):
        cat_id = cat["id"]
        has_gt = num_val_gt.get(cat_id, 0) > 0
        p = precision[:, :, k, :]
        records.append(
            {
                "id": cat_id,
                "name": cat.get("name"),
                "frequency": cat.get("frequency"),
                "train_instance_count": (
                    None if train_instance_count is None else train_instance_count.get(cat_id, 0)
                ),
                "train_image_count": (
                    None if train_image_count is None else train_image_count.get(cat_id)
                ),
                "bin": None if bins is None else bins[k],
                "num_val_gt": int(num_val_gt.get(cat_id, 0)),
                "num_dets": int(num_dets.get(cat_id, 0)),
                "AP": value(p[:, :, 0], has_gt),
                "AP50": value(p[t50, :, 0], has_gt),
                "AP75": value(p[t75, :, 0], has_gt),
                "APs": value(p[:, :, 1], has_gt),
                "APm": value(p[:, :, 2], has_gt),
                "APl": value(p[:, :, 3], has_gt),
            }
        )
    return records
