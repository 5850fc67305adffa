"""Tests of longtail/data/class_stats.py: counting, the LVIS r/c/f rule, json i/o and
load_class_stats(cfg)."""

import json
import os

import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from longtail import add_longtail_config
from longtail.data import ClassStats, frequency_group, load_class_stats
from longtail.data import class_stats as class_stats_module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LVIS_V1_STATS = os.path.join(
    os.path.dirname(REPO), "shared", "data", "lvis_v1_train_category_stats.json"
)
SHAPES_LT_BASE = os.path.join(REPO, "configs", "Base-ShapesLT-RCNN-FPN.yaml")


def _record(image_id, category_ids):
    return {
        "file_name": f"{image_id}.png",
        "image_id": image_id,
        "annotations": [
            {"id": 10 * image_id + i, "category_id": c} for i, c in enumerate(category_ids)
        ],
    }


@pytest.fixture(autouse=True)
def _fresh_cache():
    """load_class_stats caches per process; each test starts from an empty cache."""
    class_stats_module._CACHE.clear()
    yield
    class_stats_module._CACHE.clear()


# ---- counting ----------------------------------------------------------------------------------
def test_from_dataset_dicts_counts_instances_and_images():
    # Images 0..100: class 0 twice each (duplicates in one image count one image);
    # images 0..10 also hold class 1 once; image 101 is empty; class 2 never appears.
    #   instances: class 0 = 2 * 101 = 202, class 1 = 11, class 2 = 0
    #   images:    class 0 = 101 (> 100: f), class 1 = 11 (11..100: c), class 2 = 0 (r)
    dicts = [_record(i, [0, 0] + ([1] if i <= 10 else [])) for i in range(101)]
    dicts.append({"file_name": "empty.png", "image_id": 101})  # no `annotations` key at all
    stats = ClassStats.from_dataset_dicts(dicts, ["a", "b", "c"])
    assert stats.names == ("a", "b", "c")
    assert stats.instance_count == (202, 11, 0)
    assert stats.image_count == (101, 11, 0)
    assert stats.frequency == ("f", "c", "r")
    assert stats.num_images == 102
    assert stats.num_classes == 3
    assert stats.group_counts() == {"r": 1, "c": 1, "f": 1}


def test_from_dataset_dicts_small_counts_are_rare():
    # 1 image with class 1 three times, 10 images with class 0: both <= 10 images, so rare.
    dicts = [_record(0, [1, 1, 1])] + [_record(i, [0]) for i in range(1, 11)]
    stats = ClassStats.from_dataset_dicts(dicts, ["a", "b"])
    assert stats.instance_count == (10, 3)
    assert stats.image_count == (10, 1)
    assert stats.frequency == ("r", "r")
    assert stats.num_images == 11


@pytest.mark.parametrize("bad_id", [3, -1])
def test_from_dataset_dicts_rejects_unknown_category(bad_id):
    dicts = [_record(0, [0]), _record(7, [1, bad_id])]
    with pytest.raises(ValueError, match=rf"category id {bad_id}\b") as err:
        ClassStats.from_dataset_dicts(dicts, ["a", "b", "c"])
    message = str(err.value)
    assert "Annotation 71" in message and "7.png" in message and "3 classes" in message


@pytest.mark.parametrize(
    "image_count, group",
    [(0, "r"), (1, "r"), (10, "r"), (11, "c"), (100, "c"), (101, "f"), (100170, "f")],
)
def test_frequency_group_boundaries(image_count, group):
    assert frequency_group(image_count) == group


def test_inconsistent_lengths_are_rejected():
    with pytest.raises(ValueError, match="one entry per class"):
        ClassStats(("a", "b"), (1, 2), (1,), ("r", "r"), 3)
    with pytest.raises(ValueError, match="'x'"):
        ClassStats(("a",), (1,), (1,), ("x",), 3)


# ---- json --------------------------------------------------------------------------------------
def test_json_round_trip(tmp_path):
    stats = ClassStats(
        names=("cat", "dog", "eel"),
        instance_count=(5, 300, 40),
        image_count=(3, 150, 12),
        frequency=("r", "f", "c"),
        num_images=200,
    )
    path = str(tmp_path / "stats.json")
    stats.to_json(path)
    assert ClassStats.from_json(path) == stats
    with open(path) as f:
        written = json.load(f)
    assert written["num_images"] == 200
    assert [c["id"] for c in written["categories"]] == [1, 2, 3]


def test_from_json_lvis_style_with_images(tmp_path):
    # A full LVIS-style json: `images` instead of `num_images`, categories out of id order and
    # without `frequency` (derived with the LVIS rule from image_count).
    data = {
        "images": [{"id": i} for i in range(1, 6)],
        "annotations": [],
        "categories": [
            {"id": 9, "name": "zebra", "image_count": 101, "instance_count": 500},
            {"id": 2, "name": "ant", "image_count": 10, "instance_count": 12},
            {"id": 4, "name": "bee", "image_count": 11, "instance_count": 11},
        ],
    }
    path = tmp_path / "lvis_like.json"
    path.write_text(json.dumps(data))
    stats = ClassStats.from_json(str(path))
    assert stats.num_images == 5
    assert stats.names == ("ant", "bee", "zebra")
    assert stats.image_count == (10, 11, 101)
    assert stats.instance_count == (12, 11, 500)
    assert stats.frequency == ("r", "c", "f")


def test_from_json_keeps_a_given_frequency(tmp_path):
    # An explicit `frequency` wins over the rule (e.g. LVIS v0.5 jsons carry their own groups).
    data = {
        "num_images": 7,
        "categories": [
            {"id": 1, "name": "a", "image_count": 500, "instance_count": 500, "frequency": "c"}
        ],
    }
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(data))
    assert ClassStats.from_json(str(path)).frequency == ("c",)


@pytest.mark.skipif(not os.path.isfile(LVIS_V1_STATS), reason="../shared/data is not present")
def test_from_json_lvis_v1_train():
    stats = ClassStats.from_json(LVIS_V1_STATS)
    assert stats.num_classes == 1203
    assert stats.num_images == 100170
    # LVIS v1 paper / dataset facts: 337 rare, 461 common, 405 frequent categories.
    assert stats.group_counts() == {"r": 337, "c": 461, "f": 405}
    # The groups in the file follow the image-count rule.
    assert stats.frequency == tuple(frequency_group(n) for n in stats.image_count)
    assert sum(stats.instance_count) == 1270141


@pytest.mark.parametrize("missing", ["instance_count", "image_count", "name"])
def test_from_json_names_a_missing_field(tmp_path, missing):
    cat = {"id": 1, "name": "a", "image_count": 1, "instance_count": 1}
    del cat[missing]
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"num_images": 1, "categories": [cat]}))
    with pytest.raises(ValueError, match=missing) as err:
        ClassStats.from_json(str(path))
    assert str(path) in str(err.value)


def test_from_json_needs_a_number_of_images(tmp_path):
    path = tmp_path / "stats.json"
    path.write_text(
        json.dumps({"categories": [{"id": 1, "name": "a", "image_count": 1, "instance_count": 1}]})
    )
    with pytest.raises(ValueError, match="num_images"):
        ClassStats.from_json(str(path))


# ---- load_class_stats(cfg) ---------------------------------------------------------------------
def _shapes_lt_cfg(*opts):
    cfg = get_cfg()
    add_longtail_config(cfg)
    cfg.merge_from_file(SHAPES_LT_BASE)
    cfg.merge_from_list(list(opts))
    return cfg


def test_load_class_stats_from_shapes_lt_train(shapes_lt_root):
    stats = load_class_stats(_shapes_lt_cfg())
    expected = ClassStats.from_dataset_dicts(
        DatasetCatalog.get("shapes_lt_train"), MetadataCatalog.get("shapes_lt_train").thing_classes
    )
    assert stats == expected
    # ... and both agree with the statistics the generator wrote into the json.
    with open(os.path.join(shapes_lt_root, "train.json")) as f:
        train = json.load(f)
    assert stats.num_images == len(train["images"])
    assert stats.image_count == tuple(c["image_count"] for c in train["categories"])
    assert stats.instance_count == tuple(c["instance_count"] for c in train["categories"])
    assert stats.frequency == tuple(c["frequency"] for c in train["categories"])
    assert ClassStats.from_json(os.path.join(shapes_lt_root, "train.json")) == stats
    assert load_class_stats(_shapes_lt_cfg()) is stats  # cached: one copy per process


def test_load_class_stats_from_a_stats_file(tmp_path):
    stats = ClassStats(
        ("a",) * 30,
        tuple(range(1, 31)),
        tuple(range(1, 31)),
        tuple(frequency_group(n) for n in range(1, 31)),
        1000,
    )
    path = str(tmp_path / "stats.json")
    stats.to_json(path)
    assert load_class_stats(_shapes_lt_cfg("MODEL.LONGTAIL.CLASS_STATS_PATH", path)) == stats


def test_load_class_stats_rejects_a_class_count_mismatch(shapes_lt_root):
    cfg = _shapes_lt_cfg("MODEL.ROI_HEADS.NUM_CLASSES", 29)
    with pytest.raises(ValueError, match="30 classes") as err:
        load_class_stats(cfg)
    assert "MODEL.ROI_HEADS.NUM_CLASSES is 29" in str(err.value)
    assert "shapes_lt_train" in str(err.value)


def test_load_class_stats_file_mismatch_names_the_file(tmp_path):
    path = str(tmp_path / "stats.json")
    ClassStats(("a", "b"), (1, 1), (1, 1), ("r", "r"), 1).to_json(path)
    with pytest.raises(ValueError, match="2 classes") as err:
        load_class_stats(_shapes_lt_cfg("MODEL.LONGTAIL.CLASS_STATS_PATH", path))
    assert path in str(err.value)
