"""Tests of longtail.evaluation: lvis-api parity, hand-computed LVIS cases, the evaluator.

Every fixture is generated here with a fixed seed. lvis-api 0.5.3 is the reference; it uses the
removed ``np.float``, so the alias is monkeypatched inside the tests that call it.
"""

import copy
import json
import logging
import math
import uuid
import warnings

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from faster_coco_eval import COCO, COCOeval_faster

from longtail.evaluation import LongTailLVISEvaluator, evaluate_lvis_fixed, evaluate_lvis_results
from longtail.evaluation.lvis_style import instance_count_bin

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
# (height, width) of the fixture images.
IMAGE_SIZES = ((480, 640), (640, 480), (375, 500), (512, 512))
NUM_IMAGES = 40
NUM_CLASSES = 30
NO_GT_CLASSES = (7, 27)
CROWDED_IMAGES = (3, 11, 19, 27, 35)


# --------------------------------------------------------------------------------------------
# Fixture generation
# --------------------------------------------------------------------------------------------


def _ellipse_polygon(rng, x, y, w, h, num_points=8):
    """An irregular polygon inscribed in the box (x, y, w, h), as a flat [x0, y0, x1, ...] list."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, num_points))
    radii = rng.uniform(0.7, 1.0, num_points)
    xs = x + w / 2 + radii * np.cos(angles) * w / 2
    ys = y + h / 2 + radii * np.sin(angles) * h / 2
    return [round(float(v), 2) for pair in zip(xs, ys) for v in pair]


def _shape(rng, x, y, w, h, multi_part):
    """One or two polygons covering the box (two halves when multi_part)."""
    if multi_part:
        return [
            _ellipse_polygon(rng, x, y, w * 0.45, h),
            _ellipse_polygon(rng, x + w * 0.55, y, w * 0.45, h),
        ]
    return [_ellipse_polygon(rng, x, y, w, h)]


def _rle(polygons, height, width):
    """Merged compressed RLE (counts as str, as detectron2 writes it) of a list of polygons."""
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _transform(polygons, dx, dy, sx, sy, cx, cy):
    """Scale polygons by (sx, sy) around (cx, cy), then shift them by (dx, dy)."""
    out = []
    for poly in polygons:
        pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        pts[:, 0] = cx + (pts[:, 0] - cx) * sx + dx
        pts[:, 1] = cy + (pts[:, 1] - cy) * sy + dy
        out.append([round(float(v), 2) for v in pts.ravel()])
    return out


def _result(image_id, cat_id, polygons, height, width, score):
    """A result with both bbox and segmentation (what instances_to_coco_json produces)."""
    rle = _rle(polygons, height, width)
    return {
        "image_id": image_id,
        "category_id": cat_id,
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "score": score,
        "segmentation": rle,
    }


def make_fixture(seed=0):
    """The spec's parity fixture: LVIS-format GT dict and a list of results.

    40 images in 4 sizes, 30 classes (10 r / 10 c / 10 f; classes 7 and 27 have no val GT),
    ~20 % multi-part polygons, 6 neg ids per image, ~25 % of the present classes not exhaustive,
    scores rounded to 0.01 (ties), 5 crowded images with 450 results each whose TPs score low,
    one zero-area GT and a few zero-area results at score 0.99.
    """
    rng = np.random.RandomState(seed)
    freqs = ["r"] * 10 + ["c"] * 10 + ["f"] * 10
    categories = [
        {"id": i + 1, "name": f"class_{i + 1}", "frequency": freqs[i], "synset": f"s{i + 1}"}
        for i in range(NUM_CLASSES)
    ]
    gt_classes = [c for c in range(1, NUM_CLASSES + 1) if c not in NO_GT_CLASSES]
    images, annotations, results = [], [], []
    for image_id in range(1, NUM_IMAGES + 1):
        height, width = IMAGE_SIZES[image_id % len(IMAGE_SIZES)]
        present = sorted(rng.choice(gt_classes, size=rng.randint(1, 5), replace=False).tolist())
        crowded = image_id in CROWDED_IMAGES
        gts = []
        # Crowded images hold more objects, whose low-scoring TPs the per-image cap cuts.
        for _ in range(rng.randint(10, 16) if crowded else rng.randint(2, 8)):
            cat_id = int(rng.choice(present))
            # Log-uniform side lengths cover small, medium and large objects.
            w = float(np.exp(rng.uniform(np.log(8), np.log(300))))
            h = float(np.clip(w * rng.uniform(0.5, 2.0), 6, height - 2))
            w = min(w, width - 2)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            polygons = _shape(rng, x, y, w, h, multi_part=rng.rand() < 0.2)
            rle = _rle(polygons, height, width)
            gts.append((cat_id, polygons, x, y, w, h))
            annotations.append(
                {
                    "image_id": image_id,
                    "category_id": cat_id,
                    "segmentation": polygons,
                    "area": int(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                }
            )
        absent = [c for c in range(1, NUM_CLASSES + 1) if c not in present]
        neg = sorted(rng.choice(absent, size=6, replace=False).tolist())
        not_exhaustive = [c for c in present if rng.rand() < 0.25]
        images.append(
            {
                "id": image_id,
                "height": height,
                "width": width,
                "neg_category_ids": neg,
                "not_exhaustive_category_ids": not_exhaustive,
            }
        )

        image_results = []
        for cat_id, polygons, x, y, w, h in gts:
            for _ in range(rng.choice([1, 1, 2] if crowded else [0, 1, 1, 2, 3])):
                moved = _transform(
                    polygons,
                    rng.normal(0, 0.08 * w),
                    rng.normal(0, 0.08 * h),
                    rng.uniform(0.85, 1.15),
                    rng.uniform(0.85, 1.15),
                    x + w / 2,
                    y + h / 2,
                )
                # In crowded images the TPs score low, so that the per-image cap cuts them.
                low, high = (0.01, 0.15) if crowded else (0.2, 1.0)
                score = round(float(rng.uniform(low, high)), 2)
                image_results.append(_result(image_id, cat_id, moved, height, width, score))
        num_fps = 450 - len(image_results) if crowded else rng.randint(15, 40)
        candidates = [present, neg, list(range(1, NUM_CLASSES + 1))]
        for _ in range(num_fps):
            pool = candidates[rng.choice(3, p=[0.4, 0.35, 0.25])]
            cat_id = int(rng.choice(pool))
            w = float(np.exp(rng.uniform(np.log(8), np.log(250))))
            h = float(np.clip(w * rng.uniform(0.5, 2.0), 6, height - 2))
            w = min(w, width - 2)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            polygons = _shape(rng, x, y, w, h, multi_part=rng.rand() < 0.2)
            low, high = (0.1, 0.9) if crowded else (0.01, 0.8)
            score = round(float(rng.uniform(low, high)), 2)
            image_results.append(_result(image_id, cat_id, polygons, height, width, score))
        results.extend(image_results)

    # A zero-area GT of a class absent from its image: lvis-api does not load it, so the class is
    # not "present" there and a result on it is discarded (not an FP).
    zero_gt_image, zero_gt_class = images[4], 30
    assert zero_gt_class not in {a["category_id"] for a in annotations if a["image_id"] == 5}
    zero_gt_image["neg_category_ids"] = [
        c for c in zero_gt_image["neg_category_ids"] if c != zero_gt_class
    ]
    annotations.append(
        {
            "image_id": 5,
            "category_id": zero_gt_class,
            "segmentation": [[10.0, 10.0, 20.0, 10.0, 30.0, 10.0]],
            "area": 0,
            "bbox": [10.0, 10.0, 20.0, 0.0],
        }
    )
    results.append(
        _result(
            5, zero_gt_class, [[10.0, 10.0, 30.0, 10.0, 30.0, 20.0, 10.0, 20.0]], 480, 640, 0.97
        )
    )
    # Zero-area results (box with w = 0 and an empty mask) at a high score on present classes: they
    # vanish, but in the crowded images they still take one of the 300 slots.
    for image_id in (2, 9, CROWDED_IMAGES[0], CROWDED_IMAGES[1]):
        height, width = images[image_id - 1]["height"], images[image_id - 1]["width"]
        cat_id = next(a["category_id"] for a in annotations if a["image_id"] == image_id)
        empty = mask_utils.encode(np.zeros((height, width, 1), dtype=np.uint8, order="F"))[0]
        empty["counts"] = empty["counts"].decode("ascii")
        results.append(
            {
                "image_id": image_id,
                "category_id": cat_id,
                "bbox": [5.0, 5.0, 0.0, 12.0],
                "score": 0.99,
                "segmentation": empty,
            }
        )

    for index, ann in enumerate(annotations):
        ann["id"] = index + 1
    # Results arrive interleaved across images; the evaluator must keep their relative order.
    order = rng.permutation(len(results))
    results = [results[i] for i in order]
    gt = {"images": images, "annotations": annotations, "categories": categories}
    return gt, results


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory):
    """(gt dict, gt json path, results) of the parity fixture."""
    gt, results = make_fixture()
    path = tmp_path_factory.mktemp("lvis") / "gt.json"
    path.write_text(json.dumps(gt))
    return gt, str(path), results


def _for_task(results, iou_type):
    """Deep copies of the results as detectron2 hands them to lvis-api (no bbox for segm)."""
    copies = copy.deepcopy(results)
    if iou_type == "segm":
        for res in copies:
            res.pop("bbox", None)
    return copies


def _lvis_api(gt_path, results, iou_type, monkeypatch, max_dets=300):
    """lvis-api 0.5.3's (results dict, precision (T, R, K, A)) on deep copies of the results.

    ``max_dets`` is lvis-api's per-image cap (-1: none).
    """
    # lvis-api 0.5.3 uses np.float, removed in numpy 1.24.
    monkeypatch.setattr(np, "float", float, raising=False)
    from lvis import LVIS, LVISEval, LVISResults

    with warnings.catch_warnings():
        # lvis-api calls the deprecated Logger.warn.
        warnings.simplefilter("ignore", DeprecationWarning)
        lvis_gt = LVIS(gt_path)
        lvis_dt = LVISResults(lvis_gt, _for_task(results, iou_type), max_dets=max_dets)
        evaluator = LVISEval(lvis_gt, lvis_dt, iou_type)
        evaluator.run()
    return evaluator.results, evaluator.eval["precision"]


def _nan_equal(a, b, tol):
    """Equal within tol, or both NaN."""
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


# --------------------------------------------------------------------------------------------
# Hand-made ground truths
# --------------------------------------------------------------------------------------------


def _box_polygon(box):
    x, y, w, h = box
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _hand_gt(image_specs, boxes, frequencies, size=(200, 200)):
    """LVIS GT dict.

    Args:
        image_specs: {image_id: {"neg": [...], "nel": [...]}}; a missing "neg" omits the field.
        boxes: list of (image_id, category_id, [x, y, w, h]); area = w * h.
        frequencies: {category_id: "r" | "c" | "f"}.
    """
    images = []
    for image_id, spec in image_specs.items():
        image = {"id": image_id, "height": size[0], "width": size[1]}
        if "neg" in spec:
            image["neg_category_ids"] = spec["neg"]
        image["not_exhaustive_category_ids"] = spec.get("nel", [])
        images.append(image)
    annotations = [
        {
            "id": i + 1,
            "image_id": image_id,
            "category_id": cat_id,
            "bbox": list(box),
            "area": box[2] * box[3],
            "segmentation": _box_polygon(box),
        }
        for i, (image_id, cat_id, box) in enumerate(boxes)
    ]
    categories = [
        {"id": c, "name": f"c{c}", "frequency": f} for c, f in sorted(frequencies.items())
    ]
    return {"images": images, "annotations": annotations, "categories": categories}


def _det(image_id, cat_id, box, score):
    return {"image_id": image_id, "category_id": cat_id, "bbox": list(box), "score": score}


def _class_ap(outcome, cat_id):
    return next(r for r in outcome.per_class if r["id"] == cat_id)["AP"]


# --------------------------------------------------------------------------------------------
# 1, 2, 16: parity with lvis-api, raw faster-coco-eval differs, chunking invariance
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_parity_with_lvis_api(fixture_data, iou_type, monkeypatch):
    gt, gt_path, results = fixture_data
    reference, reference_precision = _lvis_api(gt_path, results, iou_type, monkeypatch)
    # Results keep their bbox for segm: the evaluator must drop it like detectron2 does.
    outcome = evaluate_lvis_results(gt_path, results, iou_type)

    for key in METRICS:
        expected = reference[key] * 100 if reference[key] > -1 else float("nan")
        assert _nan_equal(outcome.metrics[key], expected, 1e-4), (key, outcome.metrics[key])
    # Every group of the fixture has val GT: no NaN may hide a mismatch.
    assert not any(math.isnan(outcome.metrics[k]) for k in METRICS)
    assert outcome.precision.shape == reference_precision.shape == (10, 101, NUM_CLASSES, 4)
    np.testing.assert_array_equal(outcome.precision == -1, reference_precision == -1)
    np.testing.assert_allclose(outcome.precision, reference_precision, rtol=0, atol=1e-12)
    # The spec's pinned values for this fixture family are close to these.
    assert 5 < outcome.metrics["AP"] < 40


def test_raw_faster_coco_eval_differs(fixture_data):
    """Without the per-image cap (and the other steps) faster-coco-eval gives other numbers."""
    gt, _, results = fixture_data
    ours = evaluate_lvis_results(gt, results, "bbox")

    gt_coco = COCO(copy.deepcopy(gt))
    raw = COCOeval_faster(
        gt_coco,
        gt_coco.loadRes(copy.deepcopy(results)),
        "bbox",
        lvis_style=True,
        print_function=logging.getLogger(__name__).debug,
    )
    raw.params.maxDets = [300]
    raw.run()
    raw_precision = raw.eval["precision"][..., -1]
    assert np.abs(raw_precision - ours.precision).max() > 0.05
    assert abs(raw.stats_as_dict["AP_all"] * 100 - ours.metrics["AP"]) > 0.05
    # The crowded images' low-scoring TPs survive without the cap: recall goes up.
    ours_ar = ours.recall[ours.recall > -1].mean()
    raw_recall = raw.eval["recall"][..., -1]
    assert raw_recall[raw_recall > -1].mean() > ours_ar + 0.01

    # The cap alone matters: disabling it in our own pipeline changes the numbers too.
    uncapped = evaluate_lvis_results(gt, results, "bbox", max_dets_per_image=-1)
    assert uncapped.metrics["AP"] != pytest.approx(ours.metrics["AP"], abs=1e-3)


def test_chunking_is_invariant(fixture_data):
    gt, _, results = fixture_data
    reference = evaluate_lvis_results(gt, results, "bbox", chunk_size=None)
    for chunk_size in (1, 7):
        chunked = evaluate_lvis_results(gt, results, "bbox", chunk_size=chunk_size)
        np.testing.assert_array_equal(chunked.precision, reference.precision)
        np.testing.assert_array_equal(chunked.recall, reference.recall)
        assert chunked.per_class == reference.per_class
    assert reference.metrics["AP"] > 0


# --------------------------------------------------------------------------------------------
# 3, 4, 5: perfect, empty, class without val GT
# --------------------------------------------------------------------------------------------


def _perfect_gt():
    """Classes 1 (r) and 2 (c) with small and medium GT (one multi-part); 3 (f) has no GT."""
    gt = _hand_gt(
        {1: {"neg": [3]}, 2: {"neg": []}},
        [(1, 1, [10, 10, 20, 20]), (1, 2, [60, 60, 50, 40]), (2, 1, [100, 20, 40, 40])],
        {1: "r", 2: "c", 3: "f"},
    )
    # A two-part polygon GT (area = sum of the parts).
    gt["annotations"].append(
        {
            "id": 4,
            "image_id": 2,
            "category_id": 2,
            "bbox": [10, 100, 70, 30],
            "area": 30 * 30 * 2,
            "segmentation": _box_polygon([10, 100, 30, 30]) + _box_polygon([50, 100, 30, 30]),
        }
    )
    return gt


def _perfect_results(gt):
    results = []
    for ann in gt["annotations"]:
        rle = _rle(ann["segmentation"], 200, 200)
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "bbox": ann["bbox"],
                "score": 1.0,
                "segmentation": rle,
            }
        )
    return results


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_perfect_predictions(iou_type):
    gt = _perfect_gt()
    outcome = evaluate_lvis_results(gt, _perfect_results(gt), iou_type)
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APr", "APc"):
        assert outcome.metrics[key] == pytest.approx(100.0, abs=1e-9), key
    # No large GT and no f class with GT: NaN, never -100.
    assert math.isnan(outcome.metrics["APl"])
    assert math.isnan(outcome.metrics["APf"])
    assert [r["num_val_gt"] for r in outcome.per_class] == [2, 2, 0]
    if iou_type == "segm":
        # Polygon results are rasterized at the image size: same numbers.
        polygons = [
            dict(r, segmentation=a["segmentation"])
            for r, a in zip(_perfect_results(gt), gt["annotations"])
        ]
        from_polygons = evaluate_lvis_results(gt, polygons, iou_type)
        np.testing.assert_array_equal(from_polygons.precision, outcome.precision)


def test_empty_predictions(caplog):
    gt = _perfect_gt()
    with caplog.at_level(logging.WARNING, logger="longtail.evaluation.lvis_style"):
        outcome = evaluate_lvis_results(gt, [], "segm")
    assert any("No segm results" in r.getMessage() for r in caplog.records)
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APr", "APc"):
        assert outcome.metrics[key] == 0.0, key
    assert math.isnan(outcome.metrics["APl"]) and math.isnan(outcome.metrics["APf"])
    assert [r["AP"] for r in outcome.per_class] == [0.0, 0.0, None]
    assert [r["num_dets"] for r in outcome.per_class] == [0, 0, 0]


def test_class_without_val_gt():
    gt = _hand_gt(
        {1: {"neg": [2]}, 2: {"neg": []}},
        [(1, 1, [10, 10, 50, 50]), (2, 1, [20, 20, 40, 40])],
        {1: "r", 2: "r", 3: "f"},
    )
    base = [_det(1, 1, [10, 10, 50, 50], 0.8), _det(2, 1, [100, 100, 40, 40], 0.9)]
    # Class 2 has no val GT but is a neg class of image 1; class 3 is neither.
    extra = [_det(1, 2, [10, 10, 50, 50], 0.95), _det(1, 3, [10, 10, 50, 50], 0.95)]
    with_extra = evaluate_lvis_results(gt, base + extra, "bbox")
    without = evaluate_lvis_results(gt, base, "bbox")

    record = with_extra.per_class[1]
    assert record["id"] == 2 and record["num_val_gt"] == 0 and record["num_dets"] == 1
    assert all(record[k] is None for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
    assert with_extra.per_class[2]["num_dets"] == 0
    # Class 1: FP 0.9 then TP 0.8 over 2 GT -> recall 0.5 at precision 0.5.
    assert with_extra.per_class[0]["AP"] == pytest.approx(51 * 0.5 / 101, abs=1e-12)
    for key in ("AP", "APr"):
        assert with_extra.metrics[key] == without.metrics[key]
    assert math.isnan(with_extra.metrics["APf"])
    np.testing.assert_array_equal(with_extra.precision[:, :, 0], without.precision[:, :, 0])
    assert (with_extra.precision[:, :, 1:] == -1).all()
    json.dumps(with_extra.per_class)  # the records are json-serializable


def test_class_without_val_gt_on_fixture(fixture_data):
    gt, _, results = fixture_data
    full = evaluate_lvis_results(gt, results, "bbox")
    # Outside the crowded images (where they would free cap slots) drop the results on classes
    # without val GT: nothing may change.
    kept = [
        r
        for r in results
        if r["category_id"] not in NO_GT_CLASSES or r["image_id"] in CROWDED_IMAGES
    ]
    assert len(kept) < len(results)
    reduced = evaluate_lvis_results(gt, kept, "bbox")
    for cat_id in NO_GT_CLASSES:
        record = full.per_class[cat_id - 1]
        assert record["num_val_gt"] == 0 and record["AP"] is None
        assert record["num_dets"] > reduced.per_class[cat_id - 1]["num_dets"]
    np.testing.assert_array_equal(full.precision, reduced.precision)
    assert full.metrics == reduced.metrics


# --------------------------------------------------------------------------------------------
# 6-9: hand cases of the LVIS protocol
# --------------------------------------------------------------------------------------------


def test_duplicates():
    gt = _hand_gt(
        {1: {"neg": []}}, [(1, 1, [10, 10, 50, 50]), (1, 1, [100, 100, 50, 50])], {1: "f"}
    )
    tp_a, tp_b = [10, 10, 50, 50], [100, 100, 50, 50]
    duplicate = evaluate_lvis_results(
        gt, [_det(1, 1, tp_a, 0.9), _det(1, 1, tp_a, 0.8), _det(1, 1, tp_b, 0.7)], "bbox"
    )
    # TP, FP, TP over 2 GT: (51 * 1 + 50 * 2/3) / 101 at every IoU threshold.
    per_threshold = duplicate.precision[:, :, 0, 0].mean(axis=1)
    np.testing.assert_allclose(per_threshold, 0.834983, atol=1e-6)
    assert _class_ap(duplicate, 1) == pytest.approx(0.834983, abs=1e-6)
    assert duplicate.metrics["AP"] == pytest.approx(83.4983, abs=1e-4)

    far = [150, 10, 30, 30]
    fp_first = evaluate_lvis_results(
        gt, [_det(1, 1, far, 0.95), _det(1, 1, tp_a, 0.9), _det(1, 1, tp_b, 0.7)], "bbox"
    )
    assert _class_ap(fp_first, 1) == pytest.approx(0.666667, abs=1e-6)
    assert math.isnan(fp_first.metrics["APr"]) and math.isnan(fp_first.metrics["APc"])


def test_not_exhaustive():
    gt = _hand_gt(
        {1: {"neg": []}, 2: {"neg": [], "nel": [1]}},
        [(1, 1, [10, 10, 50, 50]), (2, 1, [20, 20, 60, 60])],
        {1: "c"},
    )
    tps = [_det(1, 1, [10, 10, 50, 50], 0.8), _det(2, 1, [20, 20, 60, 60], 0.7)]
    base = evaluate_lvis_results(gt, tps, "bbox")
    assert _class_ap(base, 1) == pytest.approx(1.0)
    # The matched result on the not-exhaustive image is a TP: without it recall stops at 0.5.
    only_first = evaluate_lvis_results(gt, tps[:1], "bbox")
    assert _class_ap(only_first, 1) == pytest.approx(51 / 101, abs=1e-12)
    # An unmatched result on the not-exhaustive class is ignored ...
    unmatched = [150, 150, 30, 30]
    ignored = evaluate_lvis_results(gt, tps + [_det(2, 1, unmatched, 0.9)], "bbox")
    assert _class_ap(ignored, 1) == pytest.approx(1.0)
    assert ignored.per_class[0]["num_dets"] == 3
    # ... while on an exhaustive image it is an FP (FP, TP, TP -> 2/3 everywhere).
    counted = evaluate_lvis_results(gt, tps + [_det(1, 1, unmatched, 0.9)], "bbox")
    assert _class_ap(counted, 1) == pytest.approx(2 / 3, abs=1e-12)


def _crowded_case(num_crowd):
    """Image 1: GT of classes 1 and 2 with TPs at 0.5 and `num_crowd` class-3 results at 0.9.

    Class 3 has GT only in image 2, and is not a neg class of image 1, so its results in image 1
    are discarded by the federated filter, but only after taking slots of the 300 cap.
    """
    gt = _hand_gt(
        {1: {"neg": []}, 2: {"neg": []}},
        [
            (1, 1, [10, 10, 40, 40]),
            (1, 2, [100, 100, 40, 40]),
            (2, 1, [10, 10, 40, 40]),
            (2, 3, [100, 100, 40, 40]),
        ],
        {1: "r", 2: "c", 3: "f"},
    )
    rng = np.random.RandomState(1)
    results = [
        _det(2, 1, [10, 10, 40, 40], 0.8),
        _det(2, 3, [100, 100, 40, 40], 0.8),
        _det(1, 1, [10, 10, 40, 40], 0.5),
        _det(1, 2, [100, 100, 40, 40], 0.5),
    ]
    for _ in range(num_crowd):
        x, y = rng.uniform(0, 150, size=2)
        results.append(_det(1, 3, [float(x), float(y), 20.0, 20.0], 0.9))
    return gt, results


def test_crowded_image_cap(monkeypatch, tmp_path):
    gt, results = _crowded_case(300)
    outcome = evaluate_lvis_results(gt, results, "bbox")
    assert _class_ap(outcome, 1) == pytest.approx(0.504950, abs=1e-6)
    assert _class_ap(outcome, 2) == 0.0
    assert _class_ap(outcome, 3) == pytest.approx(1.0)
    # The 300 class-3 results in image 1 are discarded, not FPs.
    assert outcome.per_class[2]["num_dets"] == 1

    # Same numbers as lvis-api.
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    reference, reference_precision = _lvis_api(str(path), results, "bbox", monkeypatch)
    np.testing.assert_allclose(outcome.precision, reference_precision, rtol=0, atol=1e-12)
    assert outcome.metrics["AP"] == pytest.approx(reference["AP"] * 100, abs=1e-9)

    # With 298 crowd results both TPs keep a slot: discarded results cost nothing.
    gt, results = _crowded_case(298)
    relaxed = evaluate_lvis_results(gt, results, "bbox")
    assert [r["AP"] for r in relaxed.per_class] == pytest.approx([1.0, 1.0, 1.0])


def test_neg_class_result_is_fp():
    gt = _hand_gt(
        {1: {"neg": []}, 2: {"neg": [1]}, 3: {}},
        [(1, 1, [10, 10, 50, 50])],
        {1: "f"},
    )
    tp = _det(1, 1, [10, 10, 50, 50], 0.8)
    on_neg = evaluate_lvis_results(gt, [tp, _det(2, 1, [10, 10, 50, 50], 0.9)], "bbox")
    # FP 0.9 then TP 0.8 over one GT: precision 0.5 at every recall threshold.
    assert _class_ap(on_neg, 1) == pytest.approx(0.5, abs=1e-12)
    assert on_neg.per_class[0]["num_dets"] == 2
    # Image 3 has no neg list: the result is discarded.
    no_neg_list = evaluate_lvis_results(gt, [tp, _det(3, 1, [10, 10, 50, 50], 0.9)], "bbox")
    assert _class_ap(no_neg_list, 1) == pytest.approx(1.0)
    assert no_neg_list.per_class[0]["num_dets"] == 1


# --------------------------------------------------------------------------------------------
# 11: segm area from the mask; closed area ranges
# --------------------------------------------------------------------------------------------


def test_segm_area_comes_from_mask(fixture_data):
    # GT: a 40x40 square (medium). An unmatched L-shaped mask has a small mask area (464) but a
    # medium box area (3600): if the box area were used, it would be an FP in APm.
    gt = _hand_gt({1: {"neg": []}}, [(1, 1, [10, 10, 40, 40])], {1: "r"})
    l_shape = [[100, 100, 160, 100, 160, 104, 104, 104, 104, 160, 100, 160]]
    fp = _result(1, 1, l_shape, 200, 200, 0.9)
    tp = _result(1, 1, _box_polygon([10, 10, 40, 40]), 200, 200, 0.8)
    assert mask_utils.area(fp["segmentation"]) < 32**2 < fp["bbox"][2] * fp["bbox"][3]

    with_bbox = evaluate_lvis_results(gt, [fp, tp], "segm")
    without_bbox = evaluate_lvis_results(gt, _for_task([fp, tp], "segm"), "segm")
    for outcome in (with_bbox, without_bbox):
        assert outcome.metrics["APm"] == pytest.approx(100.0)
        assert outcome.metrics["AP"] == pytest.approx(50.0)
        assert math.isnan(outcome.metrics["APs"])  # the FP alone does not make APs defined
    # The trap is real: faster-coco-eval uses the box area when bbox is present.
    gt_coco = COCO(copy.deepcopy(gt))
    raw = COCOeval_faster(
        gt_coco,
        gt_coco.loadRes(copy.deepcopy([fp, tp])),
        "segm",
        lvis_style=True,
        print_function=logging.getLogger(__name__).debug,
    )
    raw.params.maxDets = [300]
    raw.run()
    assert raw.stats_as_dict["AP_medium"] == pytest.approx(0.5)

    # On the parity fixture too: bbox present or not, the same segm arrays.
    fixture_gt, _, results = fixture_data
    a = evaluate_lvis_results(fixture_gt, results, "segm")
    b = evaluate_lvis_results(fixture_gt, _for_task(results, "segm"), "segm")
    np.testing.assert_array_equal(a.precision, b.precision)


def test_area_1024_is_small_and_medium():
    gt = _hand_gt({1: {"neg": []}}, [(1, 1, [10, 10, 32, 32])], {1: "r"})
    assert gt["annotations"][0]["area"] == 1024
    perfect = evaluate_lvis_results(gt, [_det(1, 1, [10, 10, 32, 32], 0.8)], "bbox")
    assert perfect.metrics["APs"] == pytest.approx(100.0)
    assert perfect.metrics["APm"] == pytest.approx(100.0)
    assert math.isnan(perfect.metrics["APl"])
    # An unmatched result of area exactly 1024 is an FP in both ranges too.
    dets = [_det(1, 1, [120, 120, 32, 32], 0.9), _det(1, 1, [10, 10, 32, 32], 0.8)]
    with_fp = evaluate_lvis_results(gt, dets, "bbox")
    assert with_fp.metrics["APs"] == pytest.approx(50.0)
    assert with_fp.metrics["APm"] == pytest.approx(50.0)
    # A 1025 GT is medium only.
    gt["annotations"][0]["area"] = 1025
    medium = evaluate_lvis_results(gt, [_det(1, 1, [10, 10, 32, 32], 0.8)], "bbox")
    assert math.isnan(medium.metrics["APs"]) and medium.metrics["APm"] == pytest.approx(100.0)


# --------------------------------------------------------------------------------------------
# 12: id checks, no mutation
# --------------------------------------------------------------------------------------------


def test_unknown_ids_raise():
    gt = _hand_gt({1: {"neg": []}}, [(1, 1, [10, 10, 50, 50])], {1: "r"})
    with pytest.raises(ValueError, match=r"category ids .*\b999\b"):
        evaluate_lvis_results(gt, [_det(1, 999, [0, 0, 5, 5], 0.5)], "bbox")
    with pytest.raises(ValueError, match=r"image ids .*\b12345\b"):
        evaluate_lvis_results(gt, [_det(12345, 1, [0, 0, 5, 5], 0.5)], "bbox")


def test_inputs_not_mutated(fixture_data):
    gt, _, results = fixture_data
    gt_before, results_before = copy.deepcopy(gt), copy.deepcopy(results)
    evaluate_lvis_results(gt, results, "bbox")
    after_bbox = evaluate_lvis_results(gt, results, "segm")
    assert results == results_before and gt == gt_before
    alone = evaluate_lvis_results(copy.deepcopy(gt), copy.deepcopy(results), "segm")
    np.testing.assert_array_equal(after_bbox.precision, alone.precision)


# --------------------------------------------------------------------------------------------
# 15: BAGS bins
# --------------------------------------------------------------------------------------------


def test_bin_boundaries():
    counts = [0, 9, 10, 99, 100, 999, 1000, 123456]
    assert [instance_count_bin(c) for c in counts] == [1, 1, 2, 2, 3, 3, 4, 4]


def test_bins_on_fixture(fixture_data):
    gt, _, results = fixture_data
    cycle = [0, 9, 10, 99, 100, 999]
    train_counts = {c: cycle[c % len(cycle)] for c in range(1, NUM_CLASSES + 1)}
    train_counts[NO_GT_CLASSES[0]] = 1000  # the only bin-4 class has no val GT -> AP4 is NaN
    train_images = {c: max(1, n // 2) for c, n in train_counts.items()}
    outcome = evaluate_lvis_results(
        gt, results, "bbox", train_instance_count=train_counts, train_image_count=train_images
    )
    for record in outcome.per_class:
        assert record["bin"] == instance_count_bin(train_counts[record["id"]])
        assert record["train_instance_count"] == train_counts[record["id"]]
        assert record["train_image_count"] == train_images[record["id"]]
    for b in (1, 2, 3):
        aps = [r["AP"] for r in outcome.per_class if r["bin"] == b and r["AP"] is not None]
        assert len(aps) >= 3
        assert outcome.metrics[f"AP{b}"] == pytest.approx(100 * np.mean(aps), abs=1e-9)
    assert math.isnan(outcome.metrics["AP4"])
    # Without counts there are no bin keys.
    assert "AP1" not in evaluate_lvis_results(gt, results[:50], "bbox").metrics


# --------------------------------------------------------------------------------------------
# The detectron2 evaluator, end to end
# --------------------------------------------------------------------------------------------


@pytest.fixture
def registered_dataset(tmp_path):
    """A 3-image LVIS dataset, dataset ids 3 (r), 5 (c), 8 (f), registered under a unique name."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    gt = _hand_gt(
        {1: {"neg": []}, 2: {"neg": [3]}, 3: {"neg": []}},
        [(1, 3, [10, 10, 40, 40]), (2, 5, [50, 60, 70, 30]), (3, 8, [5, 100, 120, 90])],
        {3: "r", 5: "c", 8: "f"},
        size=(200, 240),
    )
    json_file = tmp_path / "val.json"
    json_file.write_text(json.dumps(gt))
    name = f"longtail_test_lvis_{uuid.uuid4().hex}"
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(
        json_file=str(json_file),
        thing_classes=["c3", "c5", "c8"],
        thing_dataset_id_to_contiguous_id={3: 0, 5: 1, 8: 2},
    )
    yield name, gt
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _instances(boxes, scores, classes, size=(200, 240)):
    import torch
    from detectron2.structures import Boxes, Instances

    instances = Instances(size)
    xyxy = [[x, y, x + w, y + h] for x, y, w, h in boxes]
    instances.pred_boxes = Boxes(torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4))
    instances.scores = torch.tensor(scores, dtype=torch.float32)
    instances.pred_classes = torch.tensor(classes, dtype=torch.int64)
    masks = torch.zeros((len(boxes), *size), dtype=torch.bool)
    for i, (x, y, w, h) in enumerate(boxes):
        masks[i, y : y + h, x : x + w] = True
    instances.pred_masks = masks
    return instances


def test_evaluator_end_to_end(registered_dataset, tmp_path, caplog):
    import torch

    name, gt = registered_dataset
    out_dir = tmp_path / "eval"
    evaluator = LongTailLVISEvaluator(
        name, output_dir=str(out_dir), train_instance_count=[5, 50, 5000]
    )
    evaluator.reset()
    inputs = [{"image_id": i, "height": 200, "width": 240} for i in (1, 2, 3)]
    outputs = [
        # Image 1: a far FP of class 3 scores above its TP -> AP(3) = 0.5.
        {"instances": _instances([[150, 150, 30, 30], [10, 10, 40, 40]], [0.95, 0.9], [0, 0])},
        {"instances": _instances([[50, 60, 70, 30]], [0.8], [1])},
        {"instances": _instances([[5, 100, 120, 90]], [0.7], [2])},
    ]
    evaluator.process(inputs[:2], outputs[:2])
    evaluator.process(inputs[2:], outputs[2:])
    metrics = evaluator.evaluate()

    assert list(metrics) == ["bbox", "segm"]
    for task in ("bbox", "segm"):
        m = metrics[task]
        assert m["AP"] == pytest.approx(100 * (0.5 + 1 + 1) / 3, abs=1e-9)
        assert m["APr"] == pytest.approx(50.0, abs=1e-9)
        assert m["APc"] == pytest.approx(100.0) and m["APf"] == pytest.approx(100.0)
        assert m["AP1"] == pytest.approx(50.0) and math.isnan(m["AP3"])
        per_class = json.loads((out_dir / f"lvis_per_class_{task}.json").read_text())
        assert [r["id"] for r in per_class] == [3, 5, 8]
        assert [r["AP"] for r in per_class] == pytest.approx([0.5, 1.0, 1.0])
        assert [r["bin"] for r in per_class] == [1, 2, 4]

    saved = torch.load(out_dir / "instances_predictions.pth")
    assert [p["image_id"] for p in saved] == [1, 2, 3]
    written = json.loads((out_dir / "lvis_results.json").read_text())
    assert sorted(r["category_id"] for r in written) == [3, 3, 5, 8]
    assert all("segmentation" in r for r in written)

    # A second round without masks infers bbox only; nothing received returns {}.
    evaluator.reset()
    plain = _instances([[10, 10, 40, 40]], [0.9], [0])
    plain.remove("pred_masks")
    evaluator.process(inputs[:1], [{"instances": plain}])
    assert list(evaluator.evaluate()) == ["bbox"]
    evaluator.reset()
    with caplog.at_level(logging.WARNING):
        assert evaluator.evaluate() == {}
    assert any("Did not receive" in r.getMessage() for r in caplog.records)


def test_evaluator_default_id_mapping_and_missing_json(tmp_path):
    from detectron2.data import MetadataCatalog

    gt = _hand_gt(
        {1: {"neg": []}}, [(1, 1, [10, 10, 40, 40]), (1, 2, [60, 60, 40, 40])], {1: "r", 2: "c"}
    )
    json_file = tmp_path / "val.json"
    json_file.write_text(json.dumps(gt))
    name = f"longtail_test_lvis_{uuid.uuid4().hex}"
    missing = name + "_nojson"
    MetadataCatalog.get(name).set(json_file=str(json_file))
    MetadataCatalog.get(missing).set(thing_classes=["a"])
    try:
        # Without thing_dataset_id_to_contiguous_id, contiguous id + 1 is the dataset id.
        evaluator = LongTailLVISEvaluator(name, tasks=["bbox"], distributed=False)
        evaluator.reset()
        evaluator.process(
            [{"image_id": 1}],
            [
                {
                    "instances": _instances(
                        [[10, 10, 40, 40], [60, 60, 40, 40]], [0.9, 0.8], [0, 1], size=(200, 200)
                    )
                }
            ],
        )
        metrics = evaluator.evaluate()
        assert list(metrics) == ["bbox"]
        assert metrics["bbox"]["AP"] == pytest.approx(100.0)
        # Images processed but nothing detected: AP 0 where there is GT, NaN for the empty f group.
        evaluator.reset()
        evaluator.process([{"image_id": 1}], [{"instances": _instances([], [], [], (200, 200))}])
        empty = evaluator.evaluate()["bbox"]
        assert empty["AP"] == 0.0 and empty["APr"] == 0.0 and math.isnan(empty["APf"])
        with pytest.raises(ValueError, match="json_file"):
            LongTailLVISEvaluator(missing)
    finally:
        MetadataCatalog.remove(name)
        MetadataCatalog.remove(missing)


# --------------------------------------------------------------------------------------------
# 13: AP^fixed (no per-image cap, top K per class over the dataset)
# --------------------------------------------------------------------------------------------


def _top_k_per_class(results, k):
    """Independent per-class top-K: rank by (-score, input position), keep the input order."""
    positions = {}
    for index, res in enumerate(results):
        positions.setdefault(res["category_id"], []).append(index)
    kept = set()
    for indices in positions.values():
        ranked = sorted(indices, key=lambda i: (-results[i]["score"], i))
        kept.update(ranked[:k])
    return [res for index, res in enumerate(results) if index in kept]


def test_ap_fixed_crowded_case(caplog):
    """Spec hand case 13: 300 discarded class-3 results at 0.9 crowd image 1."""
    gt, results = _crowded_case(300)
    standard = evaluate_lvis_results(gt, results, "bbox")
    assert _class_ap(standard, 1) == pytest.approx(0.504950, abs=1e-6)
    assert _class_ap(standard, 2) == 0.0

    with caplog.at_level(logging.INFO, logger="longtail.evaluation.lvis_style"):
        fixed = evaluate_lvis_fixed(gt, results, "bbox", topk=2)
    # No per-image cap: both TPs of class 1 (0.8, 0.5) and the TP of class 2 count again.
    assert _class_ap(fixed, 1) == pytest.approx(1.0)
    assert _class_ap(fixed, 2) == pytest.approx(1.0)
    # Class 3's top 2 are crowd results at 0.9 that the federated filter then discards: the cap
    # comes first (as in lvis-api's challenge branch), so its TP at 0.8 is cut.
    assert _class_ap(fixed, 3) == 0.0
    assert fixed.per_class[2]["num_dets"] == 0
    assert fixed.metrics["APr"] == pytest.approx(100.0) and fixed.metrics["APf"] == 0.0
    # Class 2 has a single result (< K = 2); classes 1 and 3 have at least 2.
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1 of 3 classes have fewer than 2 results (0 have none)" in m for m in messages)
    # The argument form is the same code path.
    same = evaluate_lvis_results(gt, results, "bbox", max_dets_per_image=-1, max_dets_per_class=2)
    np.testing.assert_array_equal(same.precision, fixed.precision)

    # With the paper's K every class is whole: the crowd no longer costs anything.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="longtail.evaluation.lvis_style"):
        large_k = evaluate_lvis_fixed(gt, results, "bbox")
    assert [r["AP"] for r in large_k.per_class] == pytest.approx([1.0, 1.0, 1.0])
    assert any("3 of 3 classes have fewer than 10000" in r.getMessage() for r in caplog.records)

    with pytest.raises(ValueError, match="max_dets_per_class"):
        evaluate_lvis_results(gt, results, "bbox", max_dets_per_class=0)
    with pytest.raises(TypeError, match="max_dets_per_image"):
        evaluate_lvis_fixed(gt, results, "bbox", max_dets_per_image=300)


def test_ap_fixed_crowded_case_matches_lvis_api(monkeypatch, tmp_path):
    gt, results = _crowded_case(300)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    for k in (1, 2, 301):
        ours = evaluate_lvis_fixed(gt, results, "bbox", topk=k)
        reference, reference_precision = _lvis_api(
            str(path), _top_k_per_class(results, k), "bbox", monkeypatch, max_dets=-1
        )
        np.testing.assert_allclose(ours.precision, reference_precision, rtol=0, atol=1e-12)
        assert ours.metrics["AP"] == pytest.approx(reference["AP"] * 100, abs=1e-9)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_ap_fixed_parity_with_lvis_api(fixture_data, iou_type, monkeypatch):
    """AP^fixed equals lvis-api 0.5.3 run on per-class top-K results with no per-image cap."""
    gt, gt_path, results = fixture_data
    k = 60  # the fixture has ~100 results per class: the cap binds for most classes
    per_class = {}
    for res in results:
        per_class[res["category_id"]] = per_class.get(res["category_id"], 0) + 1
    assert sum(n > k for n in per_class.values()) >= 10
    reference, reference_precision = _lvis_api(
        gt_path, _top_k_per_class(results, k), iou_type, monkeypatch, max_dets=-1
    )
    outcome = evaluate_lvis_fixed(gt_path, results, iou_type, topk=k, chunk_size=7)

    for key in METRICS:
        expected = reference[key] * 100 if reference[key] > -1 else float("nan")
        assert _nan_equal(outcome.metrics[key], expected, 1e-4), (key, outcome.metrics[key])
    assert not any(math.isnan(outcome.metrics[key]) for key in METRICS)
    np.testing.assert_array_equal(outcome.precision == -1, reference_precision == -1)
    np.testing.assert_allclose(outcome.precision, reference_precision, rtol=0, atol=1e-12)
    # AP^fixed is a different number from the standard AP and from no cap at all.
    standard = evaluate_lvis_results(gt, results, iou_type)
    uncapped = evaluate_lvis_results(gt, results, iou_type, max_dets_per_image=-1)
    assert abs(outcome.metrics["AP"] - standard.metrics["AP"]) > 0.05
    assert abs(outcome.metrics["AP"] - uncapped.metrics["AP"]) > 0.05
    # A K above every class's count is the uncapped evaluation.
    whole = evaluate_lvis_fixed(gt, results, iou_type, topk=max(per_class.values()))
    np.testing.assert_array_equal(whole.precision, uncapped.precision)


def test_ap_fixed_bins(fixture_data):
    gt, _, results = fixture_data
    cycle = [0, 9, 10, 99, 100, 999, 1000]
    train_counts = {c: cycle[c % len(cycle)] for c in range(1, NUM_CLASSES + 1)}
    outcome = evaluate_lvis_fixed(gt, results, "bbox", topk=60, train_instance_count=train_counts)
    for b in (1, 2, 3, 4):
        aps = [r["AP"] for r in outcome.per_class if r["bin"] == b and r["AP"] is not None]
        assert aps
        assert outcome.metrics[f"AP{b}"] == pytest.approx(100 * np.mean(aps), abs=1e-9)
    assert "AP1" not in evaluate_lvis_fixed(gt, results, "bbox", topk=60).metrics


def test_evaluator_ap_fixed_and_bins(registered_dataset, tmp_path, caplog):
    name, _ = registered_dataset
    inputs = [{"image_id": i, "height": 200, "width": 240} for i in (1, 2, 3)]
    outputs = [
        # Image 1: a far FP of class 3 scores above its TP -> AP(3) = 0.5; with K = 1 only the FP
        # is left -> AP^fixed(3) = 0.
        {"instances": _instances([[150, 150, 30, 30], [10, 10, 40, 40]], [0.95, 0.9], [0, 0])},
        {"instances": _instances([[50, 60, 70, 30]], [0.8], [1])},
        {"instances": _instances([[5, 100, 120, 90]], [0.7], [2])},
    ]
    out_dir = tmp_path / "eval"
    evaluator = LongTailLVISEvaluator(
        name,
        output_dir=str(out_dir),
        train_instance_count=[5, 50, 5000],
        ap_fixed=True,
        ap_fixed_topk=1,
    )
    evaluator.reset()
    evaluator.process(inputs, outputs)
    with caplog.at_level(logging.INFO, logger="longtail.evaluation"):
        metrics = evaluator.evaluate()

    assert list(metrics) == ["bbox", "segm", "bbox_fixed", "segm_fixed"]
    for task in ("bbox", "segm"):
        standard, fixed = metrics[task], metrics[task + "_fixed"]
        assert set(fixed) == set(standard) == set(METRICS) | {"AP1", "AP2", "AP3", "AP4"}
        assert standard["AP"] == pytest.approx(100 * 2.5 / 3, abs=1e-9)
        assert fixed["AP"] == pytest.approx(100 * 2 / 3, abs=1e-9)
        assert fixed["APr"] == 0.0 and fixed["APc"] == pytest.approx(100.0)
        assert fixed["AP1"] == 0.0 and fixed["AP4"] == pytest.approx(100.0)
        assert math.isnan(fixed["AP3"])
        per_class = json.loads((out_dir / f"lvis_per_class_{task}_fixed.json").read_text())
        assert [r["AP"] for r in per_class] == pytest.approx([0.0, 1.0, 1.0])
        assert [r["num_dets"] for r in per_class] == [1, 1, 1]
    messages = [r.getMessage() for r in caplog.records]
    # Tables for the fixed tasks; every class has at least K = 1 result, so no lower-bound warning.
    assert any("Evaluation results for segm_fixed (AP^fixed, top 1" in m for m in messages)
    assert any("every one of the 3 classes has at least 1 result" in m for m in messages)
    assert not any("fewer than" in m for m in messages)

    # Bins off: no AP1..AP4 in any task. AP^fixed with a per-image cap of 1 in the standard AP.
    evaluator = LongTailLVISEvaluator(
        name,
        tasks=["bbox"],
        distributed=False,
        max_dets_per_image=1,
        train_instance_count=[5, 50, 5000],
        ap_fixed=True,
        instance_bins=False,
    )
    evaluator.reset()
    evaluator.process(inputs, outputs)
    metrics = evaluator.evaluate()
    assert list(metrics) == ["bbox", "bbox_fixed"]
    assert set(metrics["bbox"]) == set(metrics["bbox_fixed"]) == set(METRICS)
    # Standard: image 1 keeps only its FP. Fixed ignores the per-image cap: AP(3) = 0.5 again.
    assert metrics["bbox"]["APr"] == 0.0
    assert metrics["bbox_fixed"]["APr"] == pytest.approx(50.0, abs=1e-9)

    # AP^fixed off (the default): no extra tasks.
    evaluator = LongTailLVISEvaluator(name, tasks=["bbox"], distributed=False)
    evaluator.reset()
    evaluator.process(inputs, outputs)
    assert list(evaluator.evaluate()) == ["bbox"]
    with pytest.raises(ValueError, match="ap_fixed_topk"):
        LongTailLVISEvaluator(name, ap_fixed=True, ap_fixed_topk=0)


def _eval_cfg(stats_path, **eval_keys):
    from detectron2.config import get_cfg

    from longtail import add_longtail_config

    cfg = get_cfg()
    add_longtail_config(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.LONGTAIL.CLASS_STATS_PATH = str(stats_path)
    for key, value in eval_keys.items():
        if key == "DETECTIONS_PER_IMAGE":
            cfg.TEST.DETECTIONS_PER_IMAGE = value
        else:
            setattr(cfg.MODEL.LONGTAIL.EVAL, key, value)
    return cfg


def test_build_evaluator_reads_eval_config(registered_dataset, tmp_path, caplog):
    from longtail.engine import LongTailTrainer

    name, _ = registered_dataset
    stats_path = tmp_path / "train_stats.json"
    stats_path.write_text(
        json.dumps(
            {
                "num_images": 100,
                "categories": [
                    {"id": i + 1, "name": f"c{i}", "image_count": n, "instance_count": n}
                    for i, n in enumerate([5, 50, 5000])
                ],
            }
        )
    )
    inputs = [{"image_id": i, "height": 200, "width": 240} for i in (1, 2, 3)]
    outputs = [
        {"instances": _instances([[150, 150, 30, 30], [10, 10, 40, 40]], [0.95, 0.9], [0, 0])},
        {"instances": _instances([[50, 60, 70, 30]], [0.8], [1])},
        {"instances": _instances([[5, 100, 120, 90]], [0.7], [2])},
    ]

    def run(cfg):
        evaluator = LongTailTrainer.build_evaluator(cfg, name, output_folder=str(tmp_path / "o"))
        evaluator._distributed = False
        evaluator.reset()
        evaluator.process(inputs, outputs)
        return evaluator.evaluate()

    # Defaults: AP^fixed off, bins on (counts from CLASS_STATS_PATH).
    metrics = run(_eval_cfg(stats_path))
    assert list(metrics) == ["bbox", "segm"]
    assert metrics["bbox"]["AP1"] == pytest.approx(50.0) and math.isnan(metrics["bbox"]["AP3"])

    # AP_FIXED with K = 1 and bins off reach the evaluator; no per-image cap at inference, so
    # nothing to warn about.
    cfg = _eval_cfg(
        stats_path, AP_FIXED=True, AP_FIXED_TOPK=1, INSTANCE_BINS=False, DETECTIONS_PER_IMAGE=-1
    )
    with caplog.at_level(logging.WARNING, logger="longtail.engine.trainer"):
        metrics = run(cfg)
    assert list(metrics) == ["bbox", "segm", "bbox_fixed", "segm_fixed"]
    assert metrics["bbox_fixed"]["AP"] == pytest.approx(100 * 2 / 3, abs=1e-9)
    assert "AP1" not in metrics["bbox"] and "AP1" not in metrics["bbox_fixed"]
    assert not [r for r in caplog.records if r.name == "longtail.engine.trainer"]

    # The default K with LVIS's 300 per image at inference: AP^fixed is a lower bound, say so.
    caplog.clear()
    cfg = _eval_cfg(stats_path, AP_FIXED=True, DETECTIONS_PER_IMAGE=300)
    with caplog.at_level(logging.WARNING, logger="longtail.engine.trainer"):
        metrics = run(cfg)
    assert metrics["bbox_fixed"]["AP"] == pytest.approx(100 * 2.5 / 3, abs=1e-9)
    assert metrics["bbox_fixed"]["AP4"] == pytest.approx(100.0)
    messages = [r.getMessage() for r in caplog.records if r.name == "longtail.engine.trainer"]
    assert len(messages) == 1
    assert "lower bound" in messages[0] and "TEST.DETECTIONS_PER_IMAGE -1" in messages[0]


def test_detectron2_inference_accepts_no_per_image_cap():
    """TEST.DETECTIONS_PER_IMAGE -1 keeps every detection in upstream Fast R-CNN inference."""
    import torch
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
    from detectron2.structures import Boxes, Instances

    # 20 x 20 disjoint 8x8 proposals, 3 classes with equal scores: 1200 detections survive NMS.
    xs, ys = np.meshgrid(np.arange(20) * 10.0, np.arange(20) * 10.0)
    boxes = np.stack([xs.ravel(), ys.ravel(), xs.ravel() + 8, ys.ravel() + 8], axis=1)
    proposals = Instances((200, 200))
    proposals.proposal_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    kept = {}
    for per_image in (-1, 300):
        cfg = get_cfg()
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
        cfg.TEST.DETECTIONS_PER_IMAGE = per_image
        head = FastRCNNOutputLayers(cfg, ShapeSpec(channels=4))
        assert head.test_topk_per_image == per_image
        logits = torch.zeros((len(boxes), 4))
        deltas = torch.zeros((len(boxes), 12))
        with torch.no_grad():
            instances, _ = head.inference((logits, deltas), [proposals])
        kept[per_image] = len(instances[0])
    assert kept == {-1: 1200, 300: 300}


def test_ap_fixed_ties_at_k_keep_input_order(monkeypatch, tmp_path):
    """Tied scores at the K-th place: the result that comes first in the input list is kept,
    across images too (no per-image regrouping before the per-class cap)."""
    gt = _hand_gt(
        {1: {"neg": []}, 2: {"neg": []}},
        [(1, 1, [10, 10, 40, 40]), (1, 2, [100, 100, 40, 40]), (2, 1, [10, 10, 40, 40])],
        {1: "r", 2: "c"},
    )
    tp_1, fp_2 = _det(1, 1, [10, 10, 40, 40], 0.5), _det(2, 1, [120, 120, 30, 30], 0.5)
    first = _det(1, 2, [100, 100, 40, 40], 0.9)  # image 1 appears first in the input
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    for order, expected in (([first, fp_2, tp_1], 0.0), ([first, tp_1, fp_2], 51 / 101)):
        outcome = evaluate_lvis_fixed(gt, order, "bbox", topk=1)
        # Class 1 keeps one of its two 0.5 results: the TP (recall 1/2) or the FP.
        assert _class_ap(outcome, 1) == pytest.approx(expected, abs=1e-12)
        _, reference_precision = _lvis_api(
            str(path), _top_k_per_class(order, 1), "bbox", monkeypatch, max_dets=-1
        )
        np.testing.assert_allclose(outcome.precision, reference_precision, rtol=0, atol=1e-12)
