"""LVIS-style detection / instance segmentation evaluation on top of faster-coco-eval.

The reference protocol is lvis-api 0.5.3 (``LVISResults`` + ``LVISEval``). faster-coco-eval's
``lvis_style`` mode implements the federated matching but differs from lvis-api in three places
(per-(image, class) instead of per-image cap, no zero-area drop, slightly different precision
denominator). :func:`evaluate_lvis_results` applies the results preprocessing that makes the two
agree exactly ("parity recipe", see ``/work/shared/specs/evaluation.md`` section 2):

1. for ``segm``, drop ``bbox`` from every result so that mask area decides small/medium/large;
2. per image, stable-sort by descending score and keep the first ``max_dets_per_image`` results
   across all classes (ties keep the input order);
3. drop results whose area (box ``w*h`` or RLE mask area) is not in ``(0, inf)``, *after* the cap;
4. drop ground truth with area ``<= 0`` at load;
5. evaluate with ``maxDets = [max_dets_per_image]``, which then never binds.

**AP^fixed** (Dave et al. 2021, "Evaluating large-vocabulary object detectors: the devil is in the
details"; spec section 3) is the same recipe with step 2 replaced: no per-image cap, and per class,
over the whole dataset, the ``max_dets_per_class`` (K = 10,000) highest-scoring results (stable sort,
ties keep the input order). As in lvis-api's ``lvis_challenge_2021`` branch, a per-image cap, when
also given, is applied first, and both caps act before the zero-area drop and the federated filter,
so results those later steps discard still use up slots. ``maxDets`` is then the largest number of
results of one (image, class) pair, never K itself (faster-coco-eval reserves #images x maxDets
entries per class). See :func:`evaluate_lvis_fixed`.

To keep memory bounded at LVIS scale, classes are evaluated in chunks; every chunk only sees the
images where one of its classes is positive (has ground truth) or listed in ``neg_category_ids``:
other images cannot contribute anything to those classes. Per-class results are independent, so
the per-chunk ``precision`` / ``recall`` arrays are concatenated along the class axis and the
summary is computed here, the way lvis-api does it.

This module must not import detectron2, so that it can be used on plain json files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster
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
_AREA_LABELS = ("all", "small", "medium", "large")
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
        chunk_size: number of classes evaluated per faster-coco-eval instance (memory knob; the
            numbers do not depend on it). None or <= 0 evaluates all classes at once.
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
    _check_ids(results, set(cat_ids), set(images))

    # P(I): classes with at least one (loaded, area > 0) GT in image I; N(I): neg_category_ids.
    positives: Dict[int, set] = defaultdict(set)
    num_val_gt: Dict[int, int] = defaultdict(int)
    for ann in gt_dict["annotations"]:
        positives[ann["image_id"]].add(ann["category_id"])
        num_val_gt[ann["category_id"]] += 1
    negatives = {img_id: set(img.get("neg_category_ids", [])) for img_id, img in images.items()}

    if not images:
        logger.warning("The ground truth has no images: every metric is NaN.")
    if len(results) == 0:
        logger.warning(
            "No %s results to evaluate: AP is 0 for classes with ground truth.", iou_type
        )

    dets = _cap_per_image(results, max_dets_per_image)
    if max_dets_per_class is not None:
        dets = _cap_per_class(dets, max_dets_per_class, cat_ids, iou_type)
    dets = _copy_with_area(dets, iou_type, images)
    # Federated filter, applied early so that each chunk only carries what it can use.
    dets_by_class: Dict[int, List[Dict[str, Any]]] = defaultdict(list)
    max_per_image_class: Dict[Tuple[int, int], int] = defaultdict(int)
    for det in dets:
        img_id, cat_id = det["image_id"], det["category_id"]
        if cat_id in positives[img_id] or cat_id in negatives[img_id]:
            dets_by_class[cat_id].append(det)
            max_per_image_class[img_id, cat_id] += 1

    # faster-coco-eval caps each (image, class) at maxDets[-1]; make sure it never binds.
    if max_dets_per_image >= 0:
        max_dets = max(1, max_dets_per_image)
    else:
        max_dets = max([1, *max_per_image_class.values()])

    num_dets = {cat_id: len(class_dets) for cat_id, class_dets in dets_by_class.items()}
    gt_coco = COCO(gt_dict)
    all_img_ids = sorted(images)
    if chunk_size is None or chunk_size <= 0:
        chunk_size = max(1, len(cat_ids))
    precisions, recalls = [], []
    for begin in range(0, len(cat_ids), chunk_size):
        chunk = cat_ids[begin : begin + chunk_size]
        # The results are private copies used by one chunk only: hand them over (faster-coco-eval
        # writes into them) and let them be freed after the chunk.
        chunk_dets = [det for cat_id in chunk for det in dets_by_class.pop(cat_id, [])]
        precision, recall = _evaluate_chunk(
            gt_coco, chunk, chunk_dets, all_img_ids, positives, negatives, iou_type, max_dets
        )
        precisions.append(precision)
        recalls.append(recall)
    num_areas = len(_AREA_LABELS)
    if precisions:
        precision = np.concatenate(precisions, axis=2)
        recall = np.concatenate(recalls, axis=1)
    else:
        precision = -np.ones((len(_IOU_THRS), _NUM_REC_THRS, 0, num_areas))
        recall = -np.ones((len(_IOU_THRS), 0, num_areas))

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


def _load_gt(gt: Union[str, os.PathLike, Mapping[str, Any]]) -> Dict[str, Any]:
    """Load the GT and return a private copy without area <= 0 annotations.

    faster-coco-eval writes into annotation dicts (``ignore``, ``rle``), so annotations and
    images are copied and the caller's dict is never touched. ``iscrowd`` is removed because
    lvis-api ignores it while faster-coco-eval would turn it into an ignore flag. Annotation ids
    are renumbered 1..N because faster-coco-eval uses id 0 as its "unmatched" marker.
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
        ann = {k: v for k, v in ann.items() if k not in ("iscrowd", "ignore")}
        ann["id"] = len(annotations) + 1
        annotations.append(ann)
    if dropped:
        logger.warning("Dropped %d ground-truth annotations with area <= 0.", dropped)
    gt_dict = {k: v for k, v in source.items() if k not in ("annotations", "images", "categories")}
    gt_dict["annotations"] = annotations
    gt_dict["images"] = [dict(img) for img in source.get("images", [])]
    gt_dict["categories"] = [dict(cat) for cat in source.get("categories", [])]
    return gt_dict


def _check_frequencies(categories: Iterable[Mapping[str, Any]]) -> None:
    """Raise if a category lacks an r/c/f frequency (faster-coco-eval needs it)."""
    bad = [c["id"] for c in categories if c.get("frequency") not in _FREQUENCIES]
    if bad:
        raise ValueError(
            f"Categories {_preview(bad)} have no 'frequency' in {_FREQUENCIES}; check that the "
            "ground truth is an LVIS-format json."
        )


def _check_ids(results: Sequence[Mapping[str, Any]], cat_ids: set, img_ids: set) -> None:
    """Raise a ValueError naming result category / image ids unknown to the ground truth."""
    bad_cats = sorted({r["category_id"] for r in results} - cat_ids)
    if bad_cats:
        raise ValueError(
            f"Results contain category ids not in the ground truth: {_preview(bad_cats)}. Check "
            "that results use dataset category ids (not contiguous 0-based indices) and that they "
            "were made for this annotation file."
        )
    bad_imgs = sorted({r["image_id"] for r in results} - img_ids)
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


def _cap_per_image(results: Sequence[Mapping[str, Any]], max_dets: int) -> List[Mapping[str, Any]]:
    """Keep the ``max_dets`` highest-scoring results of every image, across classes.

    Reproduces lvis-api's ``limit_dets_per_image`` including its output order (grouped by image in
    first-appearance order; capped images sorted by score, others in input order), because the
    order decides which of two tied results is matched first.

    Args:
        results: the input results (not modified).
        max_dets: the cap; negative disables it.

    Returns:
        The kept results (the same dict objects, not copies).
    """
    if max_dets < 0:
        # No cap, and no regrouping either: the per-class cap of AP^fixed breaks score ties
        # across images by the input order.
        return list(results)
    by_image: Dict[int, List[Mapping[str, Any]]] = defaultdict(list)
    for res in results:
        by_image[res["image_id"]].append(res)
    kept = []
    for image_results in by_image.values():
        if 0 <= max_dets < len(image_results):
            # sorted() is stable, also with reverse=True: ties keep their input order.
            image_results = sorted(image_results, key=lambda r: r["score"], reverse=True)
            image_results = image_results[:max_dets]
        kept.extend(image_results)
    return kept


def _cap_per_class(
    results: Sequence[Mapping[str, Any]], max_dets: int, cat_ids: Sequence[int], iou_type: str
) -> List[Mapping[str, Any]]:
    """Keep the ``max_dets`` highest-scoring results of every class over the whole dataset.

    A stable sort by descending score, so tied results keep their input order (this also keeps the
    relative order of the results of every (image, class) pair, which is all that matching and
    accumulation look at). Logs how many classes have fewer than ``max_dets`` results: with
    results from capped inference their AP^fixed is a lower bound.

    Args:
        results: the results (not modified), after the per-image cap if any.
        max_dets: K, the per-class cap.
        cat_ids: every category id of the ground truth (for the "fewer than K" count).
        iou_type: "bbox" or "segm" (for the log message).

    Returns:
        The kept results (the same dict objects, not copies), grouped by class.
    """
    by_class: Dict[int, List[Mapping[str, Any]]] = defaultdict(list)
    for res in results:
        by_class[res["category_id"]].append(res)
    kept: List[Mapping[str, Any]] = []
    for class_results in by_class.values():
        if len(class_results) > max_dets:
            # sorted() is stable, also with reverse=True: ties keep their input order.
            class_results = sorted(class_results, key=lambda r: r["score"], reverse=True)
            class_results = class_results[:max_dets]
        kept.extend(class_results)

    short = [c for c in cat_ids if len(by_class.get(c, ())) < max_dets]
    if short:
        empty = sum(1 for c in short if c not in by_class)
        logger.warning(
            "AP^fixed (%s): %d of %d classes have fewer than %d results (%d have none). If "
            "inference capped the detections per image (TEST.DETECTIONS_PER_IMAGE >= 0), their "
            "AP^fixed is a lower bound: run inference with TEST.DETECTIONS_PER_IMAGE -1.",
            iou_type,
            len(short),
            len(cat_ids),
            max_dets,
            empty,
        )
    else:
        logger.info(
            "AP^fixed (%s): every one of the %d classes has at least %d result(s).",
            iou_type,
            len(cat_ids),
            max_dets,
        )
    return kept


def _copy_with_area(
    results: Sequence[Mapping[str, Any]], iou_type: str, images: Mapping[int, Mapping[str, Any]]
) -> List[Dict[str, Any]]:
    """Copy the fields evaluation needs and drop results whose area is not in (0, inf).

    For ``bbox`` the area is the box area; for ``segm`` it is the mask area and ``bbox`` is left
    out, so faster-coco-eval derives it from the mask and uses the mask area for s/m/l (like
    detectron2 + lvis-api). The drop happens after the per-image cap on purpose: in lvis-api such
    results still use up a slot.

    Args:
        results: capped results (not modified).
        iou_type: "bbox" or "segm".
        images: image id -> image record (for the size of polygon results).

    Returns:
        New result dicts ``{image_id, category_id, score, bbox | segmentation}``.
    """
    field_name = "bbox" if iou_type == "bbox" else "segmentation"
    missing = sum(1 for r in results if field_name not in r)
    if missing:
        raise ValueError(f"{missing} results have no '{field_name}', needed for {iou_type} eval.")

    copies = []
    for res in results:
        det = {
            "image_id": res["image_id"],
            "category_id": res["category_id"],
            "score": res["score"],
        }
        if iou_type == "bbox":
            det["bbox"] = [float(v) for v in res["bbox"]]
        else:
            det["segmentation"] = _to_compressed_rle(res["segmentation"], images[res["image_id"]])
        copies.append(det)

    if iou_type == "bbox":
        areas = [det["bbox"][2] * det["bbox"][3] for det in copies]
    else:
        areas = mask_utils.area([det["segmentation"] for det in copies]) if copies else []
    kept = [det for det, area in zip(copies, areas) if 0 < area < math.inf]
    if len(kept) < len(copies):
        logger.info("Dropped %d %s results with zero area.", len(copies) - len(kept), iou_type)
    return kept


def _to_compressed_rle(segmentation: Any, image: Mapping[str, Any]) -> Dict[str, Any]:
    """Return a new compressed RLE dict (``counts`` as str) for a result segmentation.

    Args:
        segmentation: compressed RLE (``counts`` str/bytes), uncompressed RLE (``counts`` list) or
            a list of polygons.
        image: the GT image record, for height and width of polygons.
    """
    if isinstance(segmentation, dict) and not isinstance(segmentation["counts"], list):
        rle = segmentation
    elif isinstance(segmentation, dict):
        height, width = segmentation["size"]
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = mask_utils.merge(
            mask_utils.frPyObjects(segmentation, image["height"], image["width"])
        )
    counts = rle["counts"]
    return {
        "size": list(rle["size"]),
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }


def _evaluate_chunk(
    gt_coco: COCO,
    chunk: Sequence[int],
    chunk_dets: List[Dict[str, Any]],
    all_img_ids: Sequence[int],
    positives: Mapping[int, set],
    negatives: Mapping[int, set],
    iou_type: str,
    max_dets: int,
) -> Tuple[np.ndarray, np.ndarray]:
    """Evaluate one chunk of classes with faster-coco-eval.

    Args:
        gt_coco: the ground truth.
        chunk: category ids of this chunk (sorted).
        chunk_dets: the preprocessed, federated-filtered results of the chunk classes (modified).
        all_img_ids: every image id of the ground truth.
        positives / negatives: image id -> P(I) / N(I).
        iou_type: "bbox" or "segm".
        max_dets: faster-coco-eval's per-(image, class) cap.

    Returns:
        precision (T, R, len(chunk), A) and recall (T, len(chunk), A).
    """
    chunk_set = set(chunk)
    # Only these images can hold a GT or a (kept) result of a chunk class.
    img_ids = sorted(
        img_id
        for img_id in all_img_ids
        if chunk_set & positives.get(img_id, set()) or chunk_set & negatives[img_id]
    )
    if not img_ids:
        # No class in the chunk has ground truth anywhere: all absent (-1), like lvis-api.
        return (
            -np.ones((len(_IOU_THRS), _NUM_REC_THRS, len(chunk), len(_AREA_LABELS))),
            -np.ones((len(_IOU_THRS), len(chunk), len(_AREA_LABELS))),
        )
    dt_coco = gt_coco.loadRes(chunk_dets)
    evaluator = COCOeval_faster(
        gt_coco, dt_coco, iou_type, lvis_style=True, print_function=logger.debug
    )
    evaluator.params.catIds = list(chunk)
    evaluator.params.imgIds = img_ids
    evaluator.params.maxDets = [max_dets]
    evaluator.evaluate()
    evaluator.accumulate()
    # The last axis indexes maxDets, which has a single entry.
    precision = np.asarray(evaluator.eval["precision"], dtype=np.float64)[..., -1]
    recall = np.asarray(evaluator.eval["recall"], dtype=np.float64)[..., -1]
    return precision, recall


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
