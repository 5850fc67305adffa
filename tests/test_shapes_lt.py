"""Tests of the built-in dataset generator (longtail/data/shapes_lt.py) and its registration.

The default dataset comes from the session fixture ``shapes_lt_root`` (generated once); the
generator's own behaviour (determinism, refusals, atomicity) is checked on a small spec that
generates in under a second.
"""

import json
import os
import shutil
from collections import Counter

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from pycocotools import mask as mask_utils

from longtail.data import shapes_lt
from longtail.data.shapes_lt import CATEGORY_NAMES, ShapesLTSpec, categories, ensure_shapes_lt

SMALL = ShapesLTSpec(seed=3, head_instances=40, val_instances_per_class=2)
SPLITS = ("train", "val", "val_mini")


def _lvis_group(num_images):
    """LVIS v1 rule (Gupta et al. 2019, Sec. 4), written out here independently of the library."""
    assert num_images >= 1, "every shapes-lt class appears in at least one training image"
    return "r" if num_images <= 10 else "c" if num_images <= 100 else "f"


def _load(root, split):
    with open(os.path.join(root, f"{split}.json")) as f:
        return json.load(f)


def _tree(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _temp_dirs(parent):
    return [n for n in os.listdir(parent) if n.startswith(".shapes_lt-")]


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """The small spec, generated once for this module (under a second)."""
    return ensure_shapes_lt(str(tmp_path_factory.mktemp("small") / "shapes_lt"), SMALL)


@pytest.fixture(scope="module")
def default_data(shapes_lt_root):
    return {split: _load(shapes_lt_root, split) for split in SPLITS}


# ---- the generator -----------------------------------------------------------------------------
def test_generation_is_deterministic(small_root, tmp_path):
    again = ensure_shapes_lt(str(tmp_path / "again" / "shapes_lt"), SMALL)
    first, second = _tree(small_root), _tree(again)
    assert sorted(first) == sorted(second)
    assert sum(name.endswith(".png") for name in first) == len(
        _load(small_root, "train")["images"]
    ) + len(_load(small_root, "val")["images"])
    for name in first:
        assert first[name] == second[name], f"{name} differs between two runs with the same spec"


def test_another_seed_gives_other_data(small_root, tmp_path):
    other_spec = ShapesLTSpec(seed=4, head_instances=40, val_instances_per_class=2)
    other = ensure_shapes_lt(str(tmp_path / "shapes_lt"), other_spec)
    ours, theirs = _tree(small_root), _tree(other)
    assert ours["train.json"] != theirs["train.json"]
    common_images = [n for n in ours if n.endswith(".png") and n in theirs]
    assert common_images and all(ours[n] != theirs[n] for n in common_images)
    # The class order is drawn from the seed too.
    assert [c["instance_count"] for c in categories(SMALL)] != [
        c["instance_count"] for c in categories(other_spec)
    ]


def test_existing_dataset_is_reused_not_rewritten(small_root):
    before = {n: os.path.getmtime(os.path.join(small_root, n)) for n in ("train.json", "info.json")}
    assert ensure_shapes_lt(small_root, SMALL) == small_root
    assert before == {n: os.path.getmtime(os.path.join(small_root, n)) for n in before}


def test_folder_made_with_another_spec_is_refused(small_root):
    info_before = _load(small_root, "info")
    with pytest.raises(RuntimeError, match="different settings") as err:
        ensure_shapes_lt(small_root, ShapesLTSpec(seed=5, head_instances=40))
    assert small_root in str(err.value) and "Delete the folder" in str(err.value)
    assert _load(small_root, "info") == info_before


def test_foreign_folder_is_refused_and_kept(tmp_path):
    root = tmp_path / "shapes_lt"
    root.mkdir()
    (root / "my_notes.txt").write_text("precious")
    with pytest.raises(RuntimeError, match="not a complete shapes-lt folder") as err:
        ensure_shapes_lt(str(root), SMALL)
    assert str(root) in str(err.value)
    assert sorted(os.listdir(root)) == ["my_notes.txt"]
    assert (root / "my_notes.txt").read_text() == "precious"
    assert _temp_dirs(tmp_path) == []


def test_generation_leaves_no_temporary_folder(small_root):
    parent = os.path.dirname(small_root)
    assert os.listdir(parent) == ["shapes_lt"]
    assert sorted(os.listdir(small_root)) == sorted(
        ["info.json", "train", "train.json", "val", "val.json", "val_mini.json"]
    )


def test_failed_generation_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(shapes_lt, "_write_subset", fail)
    root = tmp_path / "shapes_lt"
    with pytest.raises(OSError, match="simulated"):
        ensure_shapes_lt(str(root), SMALL)
    assert os.listdir(tmp_path) == []  # neither a half-written root nor a temporary folder


def test_concurrent_generation_keeps_the_finished_copy(small_root, tmp_path, monkeypatch):
    """Another rank finishes first: our rename fails, its complete copy is kept and used."""
    root = tmp_path / "shapes_lt"
    write_subset = shapes_lt._write_subset

    def finish_elsewhere_first(*args, **kwargs):
        write_subset(*args, **kwargs)
        shutil.copytree(small_root, root)

    monkeypatch.setattr(shapes_lt, "_write_subset", finish_elsewhere_first)
    assert ensure_shapes_lt(str(root), SMALL) == str(root)
    assert _tree(str(root)) == _tree(small_root)
    assert os.listdir(tmp_path) == ["shapes_lt"]


def test_folder_completed_by_another_rank_during_the_checks_is_accepted(
    small_root, tmp_path, monkeypatch
):
    root = tmp_path / "shapes_lt"
    is_complete = shapes_lt._is_complete
    calls = []

    def completed_right_after_check(path, spec):
        result = is_complete(path, spec)
        if not calls:  # the first check sees nothing; then another rank's rename lands
            shutil.copytree(small_root, root)
        calls.append(result)
        return result

    monkeypatch.setattr(shapes_lt, "_is_complete", completed_right_after_check)
    assert ensure_shapes_lt(str(root), SMALL) == str(root)
    assert _tree(str(root)) == _tree(small_root)


# ---- the default dataset -----------------------------------------------------------------------
def test_train_split_has_all_lvis_frequency_groups(default_data):
    train = default_data["train"]
    images_of = {c["id"]: set() for c in train["categories"]}
    for ann in train["annotations"]:
        images_of[ann["category_id"]].add(ann["image_id"])
    recomputed = {cid: _lvis_group(len(imgs)) for cid, imgs in images_of.items()}
    assert recomputed == {c["id"]: c["frequency"] for c in train["categories"]}
    assert set(recomputed.values()) == {"r", "c", "f"}


def test_category_counts_match_annotations(default_data):
    train = default_data["train"]
    instances = Counter(a["category_id"] for a in train["annotations"])
    images = Counter(
        cid for _, cid in {(a["image_id"], a["category_id"]) for a in train["annotations"]}
    )
    for split in SPLITS:  # every split carries the *training* statistics, as LVIS's jsons do
        cats = default_data[split]["categories"]
        assert [c["id"] for c in cats] == list(range(1, len(CATEGORY_NAMES) + 1))
        assert {c["id"]: c["instance_count"] for c in cats} == dict(instances)
        assert {c["id"]: c["image_count"] for c in cats} == dict(images)


def test_categories_from_seed_equal_the_json(default_data):
    assert categories() == default_data["train"]["categories"]
    assert categories(ShapesLTSpec()) == default_data["val"]["categories"]
    assert [c["name"] for c in categories()] == list(CATEGORY_NAMES)


def test_val_has_enough_instances_of_every_class(default_data):
    counts = Counter(a["category_id"] for a in default_data["val"]["annotations"])
    assert set(counts) == set(range(1, len(CATEGORY_NAMES) + 1))
    assert min(counts.values()) >= 30
    assert min(counts.values()) >= ShapesLTSpec().val_instances_per_class


@pytest.mark.parametrize("split", SPLITS)
def test_image_level_labels_are_exhaustive(default_data, split):
    data = default_data[split]
    all_ids = {c["id"] for c in data["categories"]}
    present = {img["id"]: set() for img in data["images"]}
    for ann in data["annotations"]:
        present[ann["image_id"]].add(ann["category_id"])
    for img in data["images"]:
        assert present[img["id"]], f"image {img['id']} has no object"
        assert sorted(img["neg_category_ids"]) == sorted(all_ids - present[img["id"]])
        assert img["not_exhaustive_category_ids"] == []


@pytest.mark.parametrize("split", ("train", "val"))
def test_polygons_are_valid_and_match_area_and_bbox(default_data, shapes_lt_root, split):
    data = default_data[split]
    size = {img["id"]: (img["height"], img["width"]) for img in data["images"]}
    rles_of = {}
    for ann in data["annotations"]:
        h, w = size[ann["image_id"]]
        assert len(ann["segmentation"]) >= 1
        for poly in ann["segmentation"]:
            pts = np.asarray(poly, dtype=np.float64)
            assert pts.size % 2 == 0 and pts.size >= 6, ann["id"]
            xs, ys = pts[0::2], pts[1::2]
            assert xs.min() >= 0 and xs.max() <= w and ys.min() >= 0 and ys.max() <= h, ann["id"]
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], h, w))
        assert ann["area"] == pytest.approx(float(mask_utils.area(rle)), abs=1e-6)
        assert ann["bbox"] == pytest.approx([float(v) for v in mask_utils.toBbox(rle)], abs=1e-6)
        x, y, bw, bh = ann["bbox"]
        assert bw > 0 and bh > 0 and x >= 0 and y >= 0 and x + bw <= w and y + bh <= h
        rles_of.setdefault(ann["image_id"], []).append(rle)
    # The module promises non-overlapping objects, so each polygon is exactly the visible mask.
    for image_id, rles in rles_of.items():
        iou = mask_utils.iou(rles, rles, [0] * len(rles))
        np.fill_diagonal(iou, 0)
        assert iou.max() == 0, f"objects overlap in image {image_id}"
    # Image files exist and have the size the json says.
    for img in data["images"][:20]:
        pixels = cv2.imread(os.path.join(shapes_lt_root, img["file_name"]))
        assert pixels is not None and pixels.shape == (img["height"], img["width"], 3)


def test_ids_are_unique_across_splits(default_data):
    train, val = default_data["train"], default_data["val"]
    for key in ("images", "annotations"):
        ids = [x["id"] for x in train[key]] + [x["id"] for x in val[key]]
        assert len(ids) == len(set(ids)), key


def test_val_mini_is_a_prefix_of_val(default_data):
    val, mini = default_data["val"], default_data["val_mini"]
    n = min(shapes_lt.VAL_MINI_IMAGES, len(val["images"]))
    assert 0 < n < len(val["images"])
    assert mini["images"] == val["images"][:n]
    keep = {img["id"] for img in mini["images"]}
    assert mini["annotations"] == [a for a in val["annotations"] if a["image_id"] in keep]
    assert mini["categories"] == val["categories"]


# ---- registration ------------------------------------------------------------------------------
def test_registered_splits_load_from_the_session_folder(shapes_lt_root, default_data):
    dicts = DatasetCatalog.get("shapes_lt_val_mini")
    mini = default_data["val_mini"]
    assert [d["image_id"] for d in dicts] == sorted(img["id"] for img in mini["images"])
    assert all(d["file_name"].startswith(shapes_lt_root + os.sep) for d in dicts)
    assert all(os.path.isfile(d["file_name"]) for d in dicts)
    # Contiguous ids: dataset id k + 1 becomes k.
    assert sorted(a["category_id"] for d in dicts for a in d["annotations"]) == sorted(
        a["category_id"] - 1 for a in mini["annotations"]
    )
    for name in ("shapes_lt_train", "shapes_lt_val", "shapes_lt_val_mini"):
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == list(CATEGORY_NAMES)
        assert meta.evaluator_type == "lvis"
        assert os.path.dirname(meta.json_file) == shapes_lt_root
        assert meta.class_image_count == [
            {"id": c["id"], "image_count": c["image_count"]}
            for c in default_data["train"]["categories"]
        ]
