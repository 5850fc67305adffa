"""Bad input files fail early, with the exception type and a message that names the culprit:
load_lvis_style_json, register_lvis_style_instances and ClassStats.from_json on files written here.
"""

import json
import os
import re
import uuid

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from longtail.data import ClassStats, load_lvis_style_json, register_lvis_style_instances

CATEGORIES = [
    {"id": 1, "name": "circle", "image_count": 1, "instance_count": 1},
    {"id": 2, "name": "square", "image_count": 1, "instance_count": 1},
]
SQUARE = [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]


def _image(image_id, file_name):
    return {
        "id": image_id,
        "file_name": file_name,
        "height": 64,
        "width": 64,
        "neg_category_ids": [],
        "not_exhaustive_category_ids": [],
    }


def _annotation(ann_id, image_id, category_id):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": SQUARE,
        "bbox": [10.0, 10.0, 20.0, 20.0],
        "area": 400.0,
    }


def _dataset(tmp_path, **overrides):
    """A valid 2-image LVIS-style dataset under tmp_path (images are empty files: the loader
    only checks that they exist); ``overrides`` replace top-level keys, ``None`` drops one."""
    (tmp_path / "images").mkdir(exist_ok=True)
    for name in ("a.png", "b.png"):
        (tmp_path / "images" / name).write_bytes(b"")
    data = {
        "images": [_image(1, "a.png"), _image(2, "b.png")],
        "annotations": [_annotation(7, 1, 1), _annotation(8, 2, 2)],
        "categories": CATEGORIES,
    }
    data.update(overrides)
    data = {k: v for k, v in data.items() if v is not None}
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(data))
    return str(path), str(tmp_path / "images")


@pytest.fixture
def dataset_name():
    """A fresh dataset name, unregistered again after the test."""
    name = f"test_bad_input_{uuid.uuid4().hex[:8]}"
    yield name
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)


def test_valid_dataset_loads(tmp_path, dataset_name):
    # The baseline the other tests break one thing of.
    json_file, image_root = _dataset(tmp_path)
    dicts = load_lvis_style_json(json_file, image_root, dataset_name)
    assert [d["file_name"] for d in dicts] == [
        os.path.join(image_root, n) for n in ("a.png", "b.png")
    ]
    assert [[a["category_id"] for a in d["annotations"]] for d in dicts] == [[0], [1]]
    register_lvis_style_instances(dataset_name, json_file, image_root)
    assert MetadataCatalog.get(dataset_name).thing_classes == ["circle", "square"]
    assert len(DatasetCatalog.get(dataset_name)) == 2


# ---- missing / malformed files -----------------------------------------------------------------
def test_missing_json(tmp_path, dataset_name):
    path = str(tmp_path / "nowhere" / "annotations.json")
    with pytest.raises(FileNotFoundError, match=re.escape(repr(path))):
        load_lvis_style_json(path, str(tmp_path), dataset_name)
    with pytest.raises(FileNotFoundError, match=re.escape(repr(path))):
        register_lvis_style_instances(dataset_name, path, str(tmp_path))
    assert dataset_name not in DatasetCatalog.list()  # a failed registration registers nothing
    with pytest.raises(FileNotFoundError, match=re.escape(repr(path))):
        ClassStats.from_json(path)


def test_malformed_json(tmp_path, dataset_name):
    path = tmp_path / "annotations.json"
    path.write_text('{"images": [], "annotations": [')
    with pytest.raises(ValueError, match="not valid json") as err:
        load_lvis_style_json(str(path), str(tmp_path), dataset_name)
    assert str(path) in str(err.value) and dataset_name in str(err.value)
    with pytest.raises(ValueError, match=re.escape(repr(str(path)))):
        register_lvis_style_instances(dataset_name, str(path), str(tmp_path))
    assert dataset_name not in DatasetCatalog.list()
    with pytest.raises(ValueError, match="not valid json") as err:
        ClassStats.from_json(str(path))
    assert str(path) in str(err.value)


@pytest.mark.parametrize("key", ["annotations", "images", "categories"])
def test_json_without_a_required_list(tmp_path, dataset_name, key):
    json_file, image_root = _dataset(tmp_path, **{key: None})
    with pytest.raises(ValueError, match=f"no `{key}` list") as err:
        load_lvis_style_json(json_file, image_root, dataset_name)
    assert json_file in str(err.value)


def test_json_that_is_not_an_object(tmp_path, dataset_name):
    path = tmp_path / "results.json"  # what --eval-only writes: a list of detections
    path.write_text(
        json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}])
    )
    with pytest.raises(ValueError, match=re.escape(repr(str(path)))):
        load_lvis_style_json(str(path), str(tmp_path), dataset_name)


def test_class_stats_json_that_is_not_an_object_is_explained(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps([{"image_id": 1}]))
    with pytest.raises(ValueError) as err:
        ClassStats.from_json(str(path))
    message = str(err.value)
    assert str(path) in message
    assert "json object" in message and "list" in message
    assert "indices must be integers" not in message  # Python's internals are no explanation


def test_class_stats_json_with_a_bad_frequency_names_the_file(tmp_path):
    path = tmp_path / "stats.json"
    cat = {"id": 1, "name": "a", "image_count": 3, "instance_count": 3, "frequency": "rare"}
    path.write_text(json.dumps({"num_images": 3, "categories": [cat]}))
    with pytest.raises(ValueError, match="'rare'") as err:
        ClassStats.from_json(str(path))
    assert str(path) in str(err.value)


def test_class_stats_json_without_categories(tmp_path):
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"num_images": 3}))
    with pytest.raises(ValueError, match="no `categories` list") as err:
        ClassStats.from_json(str(path))
    assert str(path) in str(err.value)


# ---- bad content -------------------------------------------------------------------------------
def test_unknown_category_id(tmp_path, dataset_name):
    json_file, image_root = _dataset(
        tmp_path, annotations=[_annotation(7, 1, 1), _annotation(8, 2, 99)]
    )
    with pytest.raises(ValueError, match=r"annotation 8 \(image 2\)") as err:
        load_lvis_style_json(json_file, image_root, dataset_name)
    message = str(err.value)
    assert "category_id 99" in message and json_file in message and "ids 1..2" in message


def test_unknown_category_id_with_no_categories(tmp_path, dataset_name):
    json_file, image_root = _dataset(tmp_path, categories=[])
    with pytest.raises(ValueError, match=r"annotation 7 \(image 1\).*category_id 1\b"):
        load_lvis_style_json(json_file, image_root, dataset_name)


def test_annotation_of_an_unlisted_image(tmp_path, dataset_name):
    json_file, image_root = _dataset(
        tmp_path, annotations=[_annotation(7, 1, 1), _annotation(8, 5, 2)]
    )
    with pytest.raises(ValueError, match=r"image ids \[5\].*not in its `images` list"):
        load_lvis_style_json(json_file, image_root, dataset_name)


def test_missing_image_file(tmp_path, dataset_name):
    json_file, image_root = _dataset(tmp_path, images=[_image(1, "a.png"), _image(2, "gone.png")])
    with pytest.raises(
        FileNotFoundError, match=re.escape(os.path.join(image_root, "gone.png"))
    ) as err:
        load_lvis_style_json(json_file, image_root, dataset_name)
    message = str(err.value)
    assert "1 of 2 images" in message and image_root in message
    assert os.path.join(image_root, "a.png") not in message
    # Registration reads only the categories; the error comes when the dataset is loaded.
    register_lvis_style_instances(dataset_name, json_file, image_root)
    with pytest.raises(FileNotFoundError, match="gone.png"):
        DatasetCatalog.get(dataset_name)


# ---- registration ------------------------------------------------------------------------------
def test_registering_a_name_twice(tmp_path, dataset_name):
    json_file, image_root = _dataset(tmp_path)
    register_lvis_style_instances(dataset_name, json_file, image_root)
    with pytest.raises(ValueError, match=f"{dataset_name!r} is already registered"):
        register_lvis_style_instances(dataset_name, json_file, image_root)
    assert MetadataCatalog.get(dataset_name).json_file == json_file  # the first one is kept


@pytest.mark.parametrize("name", ["shapes_lt_train", "lvis_v1_train"])
def test_builtin_names_cannot_be_taken(tmp_path, name):
    json_file, image_root = _dataset(tmp_path)
    with pytest.raises(ValueError, match=f"{name!r} is already registered"):
        register_lvis_style_instances(name, json_file, image_root)
