"""The data preflight (longtail/data/preflight.py) and its CLI (longtail/tools/check_dataset.py):
each problem class on a tiny hand-made json and image folder is counted, named by its first record,
and sorted into errors and warnings; clean data has no problem; the CLI's exit codes."""

import copy
import json
import math
import os
import subprocess
import sys
import uuid

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image

from longtail.data import register_lvis_style_instances
from longtail.data.preflight import (
    PROBLEM_KINDS,
    check_dataset_dicts,
    check_lvis_json,
    check_registered_dataset,
)
from longtail.tools import check_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32  # every image is SIZE x SIZE


def _square(x, y, s):
    return [float(x), float(y), float(x + s), float(y), float(x + s), float(y + s), float(x),
            float(y + s)]


def _clean():
    """A valid 3-image, 4-annotation, 2-category LVIS-style dataset (as a dict)."""
    images = [
        {"id": i, "file_name": f"{i}.png", "height": SIZE, "width": SIZE,
         "neg_category_ids": [], "not_exhaustive_category_ids": []}
        for i in (1, 2, 3)
    ]
    anns = [
        {"id": 10 + k, "image_id": img, "category_id": cat, "bbox": [4.0, 4.0, 10.0, 10.0],
         "segmentation": [_square(4, 4, 10)], "area": 100.0}
        for k, (img, cat) in enumerate([(1, 1), (1, 2), (2, 1), (3, 2)])
    ]
    cats = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]
    return {"images": images, "annotations": anns, "categories": cats}


def _write(tmp_path, data):
    """Write ``data`` and a real SIZE x SIZE png per image under tmp_path; returns (json, root)."""
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    for img in data["images"]:
        if isinstance(img, dict) and isinstance(img.get("file_name"), str):
            path = root / img["file_name"]
            if not path.exists():
                Image.new("RGB", (SIZE, SIZE), (90, 120, 150)).save(path)
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(data))
    return str(path), str(root)


@pytest.fixture
def dataset_name():
    name = f"test_check_dataset_{uuid.uuid4().hex[:8]}"
    yield name
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)


# ---- clean data --------------------------------------------------------------------------------
def test_clean_json_has_no_problem(tmp_path):
    json_file, root = _write(tmp_path, _clean())
    for full in (False, True):
        report = check_lvis_json(json_file, root, full=full)
        assert report.ok and report.counts == {}, report.summary()
        assert (report.num_images, report.num_annotations, report.num_categories) == (3, 4, 2)
        assert "Result: OK (no problems)" in report.summary()


def test_clean_registered_dataset_has_no_problem(tmp_path, dataset_name):
    json_file, root = _write(tmp_path, _clean())
    register_lvis_style_instances(dataset_name, json_file, root)
    report = check_registered_dataset(dataset_name, full=True)
    assert report.ok and report.counts == {}, report.summary()
    assert report.num_annotations == 4 and report.mode == "full"


# ---- each problem class on the raw json --------------------------------------------------------
def _set(path, value):
    """A mutation that sets data[path[0]][path[1]]...[path[-1]] = value."""
    def mutate(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


def _append(key, record):
    return lambda data: data[key].append(record)


def _ann(ann_id, image_id=1, category_id=1, bbox=(4.0, 4.0, 10.0, 10.0), segm=None):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": list(bbox),
            "segmentation": [_square(4, 4, 10)] if segm is None else segm}


# (kind, mutation, text the first record must contain); each mutation makes exactly one offender
CASES = [
    ("invalid_category_record", _set(["categories", 1, "name"], None), "category #1"),
    ("invalid_image_record", _set(["images", 2, "height"], "32"), "image #2"),
    ("invalid_annotation_record", _set(["annotations", 1, "bbox"], [1.0, 2.0, 3.0]),
     "annotation #1"),
    ("invalid_annotation_record", _set(["annotations", 0, "bbox"], [1.0, "2", 3.0, 4.0]),
     "annotation #0"),
    ("duplicate_category_id", _append("categories", {"id": 2, "name": "square2"}),
     "category id 2"),
    ("duplicate_image_id", _append("images", {"id": 2, "file_name": "2b.png", "height": SIZE,
                                              "width": SIZE}), "image id 2"),
    ("duplicate_annotation_id", _set(["annotations", 3, "id"], 12), "annotation id 12"),
    ("unknown_image_id", _append("annotations", _ann(50, image_id=9)), "annotation 50"),
    ("unknown_category_id", _append("annotations", _ann(51, category_id=7)), "category_id 7"),
    ("degenerate_box", _set(["annotations", 2, "bbox"], [4.0, 4.0, -3.0, 10.0]), "annotation 12"),
    ("degenerate_box", _set(["annotations", 2, "bbox"], [4.0, math.nan, 3.0, 10.0]),
     "annotation 12"),
    ("empty_box", _set(["annotations", 2, "bbox"], [4.0, 4.0, 0.0, 10.0]), "annotation 12"),
    ("box_outside_image", _set(["annotations", 3, "bbox"], [40.0, 4.0, 10.0, 10.0]),
     "annotation 13"),
    ("box_beyond_image", _set(["annotations", 3, "bbox"], [25.0, 4.0, 10.0, 10.0]),
     "annotation 13"),
    ("degenerate_polygon", _set(["annotations", 1, "segmentation"], [[1.0, 2.0, 3.0, 4.0]]),
     "polygon 0 has 4 coordinates"),
    ("degenerate_polygon", _set(["annotations", 1, "segmentation"],
                                [_square(4, 4, 10), _square(4, 4, 10)[:7]]),
     "polygon 1 has 7 coordinates"),
    ("degenerate_polygon", _set(["annotations", 1, "segmentation"],
                                [[[4, 4], [14, 4], [14, 14], [4, 14], [4, 10], [4, 8]]]),
     "not a flat list of numbers"),
    ("zero_area_polygon", _set(["annotations", 1, "segmentation"], [[1.0, 1.0, 5.0, 5.0, 9.0,
                                                                     9.0]]), "annotation 11"),
    ("empty_segmentation", _set(["annotations", 1, "segmentation"], []), "annotation 11"),
    ("unknown_neg_category_id", _set(["images", 0, "neg_category_ids"], [1, 99]), "[99]"),
]


@pytest.mark.parametrize("kind, mutate, first", CASES, ids=[f"{c[0]}-{i}" for i, c in
                                                            enumerate(CASES)])
def test_each_problem_is_counted_and_named(tmp_path, kind, mutate, first):
    data = _clean()
    mutate(data)
    json_file, root = _write(tmp_path, data)
    report = check_lvis_json(json_file, root)
    assert report.counts == {kind: 1}, report.summary()
    assert first in report.records[kind][0], report.records[kind]
    assert report.ok == (PROBLEM_KINDS[kind].severity == "warning")
    assert kind in report.summary() and first in report.summary()


def test_missing_unreadable_and_wrong_size_images(tmp_path):
    data = _clean()
    json_file, root = _write(tmp_path, data)
    os.remove(os.path.join(root, "1.png"))
    with open(os.path.join(root, "2.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    Image.new("RGB", (SIZE, SIZE + 8)).save(os.path.join(root, "3.png"))

    cheap = check_lvis_json(json_file, root)
    assert cheap.counts == {"missing_image": 1}  # cheap: files exist, nothing is decoded
    assert os.path.join(root, "1.png") in cheap.records["missing_image"][0]

    full = check_lvis_json(json_file, root, full=True)
    assert full.counts == {"missing_image": 1, "unreadable_image": 1, "image_size_mismatch": 1}
    assert os.path.join(root, "2.png") in full.records["unreadable_image"][0]
    assert "decoded 32 x 40, recorded 32 x 32" in full.records["image_size_mismatch"][0]
    assert not full.ok


def test_json_schema(tmp_path):
    (tmp_path / "list.json").write_text("[]")
    report = check_lvis_json(str(tmp_path / "list.json"))
    assert report.counts == {"invalid_json": 1} and "json list" in report.records["invalid_json"][0]
    data = _clean()
    del data["categories"]
    report = check_lvis_json(data)
    assert report.records["invalid_json"] == ["no `categories` list"]
    report = check_lvis_json(str(tmp_path / "nowhere.json"))
    assert "does not exist" in report.records["invalid_json"][0]


def test_counts_beyond_the_records_shown(tmp_path):
    data = _clean()
    data["annotations"] += [_ann(100 + k, bbox=(4.0, 4.0, -1.0, 3.0)) for k in range(12)]
    report = check_lvis_json(data, max_records=3)
    assert report.counts == {"degenerate_box": 12}
    assert [r.split(":")[0] for r in report.records["degenerate_box"]] == [
        "annotation 100 of image 1 (1.png)", "annotation 101 of image 1 (1.png)",
        "annotation 102 of image 1 (1.png)"]
    assert "... and 9 more" in report.summary()


def test_without_an_image_root_files_are_not_checked(tmp_path):
    data = _clean()
    data["images"][0]["file_name"] = "gone.png"
    assert check_lvis_json(data).ok
    assert "images were not decoded" in check_lvis_json(data, full=True).summary()


# ---- detectron2 dataset dicts ------------------------------------------------------------------
def _dicts(tmp_path):
    _, root = _write(tmp_path, _clean())
    return [
        {"file_name": os.path.join(root, f"{i}.png"), "image_id": i, "height": SIZE, "width": SIZE,
         "annotations": [{"bbox": [4, 4, 14, 14], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0,
                          "segmentation": [_square(4, 4, 10)]}]}
        for i in (1, 2, 3)
    ]


def test_dicts_clean_and_xyxy(tmp_path):
    report = check_dataset_dicts(_dicts(tmp_path), ["a", "b"], full=True)
    assert report.ok and report.counts == {}, report.summary()


def test_dicts_problems(tmp_path):
    dicts = _dicts(tmp_path)
    dicts[0]["annotations"][0]["category_id"] = 2  # two classes: 0 and 1
    dicts[1]["image_id"] = 3
    dicts[2]["annotations"].append({"bbox": [20, 20, 10, 30], "bbox_mode": BoxMode.XYXY_ABS,
                                    "category_id": 1})  # x1 < x0
    dicts[2]["file_name"] += ".gone"
    dicts[2]["neg_category_ids"] = [5]
    report = check_dataset_dicts(dicts, ["a", "b"], dataset_category_ids=[1, 2], name="mine")
    assert report.counts == {"unknown_category_id": 1, "duplicate_image_id": 1,
                             "degenerate_box": 1, "missing_image": 1,
                             "unknown_neg_category_id": 1}, report.summary()
    assert "annotation #0 of image 1" in report.records["unknown_category_id"][0]
    assert "contiguous ids 0..1" in report.records["unknown_category_id"][0]
    assert "annotation #1 of image 3" in report.records["degenerate_box"][0]
    assert report.records["missing_image"][0].endswith("3.png.gone)")
    assert report.summary().startswith("Data check of mine (cheap)")


def test_unloadable_registered_dataset_falls_back_to_its_json(tmp_path, dataset_name):
    data = _clean()
    data["images"][1]["file_name"] = "gone.png"  # the loader refuses missing images
    data["annotations"][0]["bbox"] = [4.0, 4.0, -2.0, 5.0]
    json_file, root = _write(tmp_path, data)
    os.remove(os.path.join(root, "gone.png"))
    register_lvis_style_instances(dataset_name, json_file, root)
    report = check_registered_dataset(dataset_name)
    assert report.counts == {"dataset_not_loadable": 1, "missing_image": 1, "degenerate_box": 1}
    assert "FileNotFoundError" in report.records["dataset_not_loadable"][0]
    assert "gone.png" in report.records["missing_image"][0]
    assert json_file in report.summary()  # the note says which json was checked instead


def test_unregistered_name():
    report = check_registered_dataset("no_such_dataset_anywhere")
    assert report.counts == {"dataset_not_loadable": 1}
    assert "no dataset is registered as 'no_such_dataset_anywhere'" in report.summary()


# ---- the CLI -----------------------------------------------------------------------------------
def test_cli_exit_codes(tmp_path, dataset_name, capsys):
    clean_dir, bad_dir = tmp_path / "clean", tmp_path / "bad"
    clean_dir.mkdir()
    bad_dir.mkdir()
    json_file, root = _write(clean_dir, _clean())
    assert check_dataset.main(["--json", json_file, "--image-root", root, "--full"]) == 0
    assert "Result: OK" in capsys.readouterr().out

    register_lvis_style_instances(dataset_name, json_file, root)
    assert check_dataset.main(["--dataset", dataset_name]) == 0
    assert f"Data check of {dataset_name} (cheap)" in capsys.readouterr().out

    # warnings alone still exit 0
    data = copy.deepcopy(_clean())
    data["annotations"][0]["bbox"] = [25.0, 4.0, 10.0, 10.0]
    warn_json, warn_root = _write(bad_dir, data)
    assert check_dataset.main(["--json", warn_json, "--image-root", warn_root]) == 0
    assert "box_beyond_image: 1" in capsys.readouterr().out

    data["annotations"][1]["segmentation"] = [[1.0, 2.0, 3.0]]
    _write(bad_dir, data)
    assert check_dataset.main(["--json", warn_json, "--max-records", "1"]) == 1
    out = capsys.readouterr().out
    assert "degenerate_polygon: 1" in out and "annotation 11 of image 1" in out
    assert "Errors in:" in out

    with pytest.raises(SystemExit) as exit_info:
        check_dataset.main([])  # nothing to check is a usage error
    assert exit_info.value.code == 2


def test_cli_as_a_module(tmp_path):
    """The documented command, in a fresh interpreter: an invalid json exits with 1."""
    data = _clean()
    data["annotations"][0]["category_id"] = 5
    json_file, root = _write(tmp_path, data)
    cmd = [sys.executable, "-m", "longtail.tools.check_dataset", "--json", json_file,
           "--image-root", root]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "unknown_category_id: 1" in proc.stdout and "category_id 5" in proc.stdout
