"""Unreadable images during training (longtail/data/robust_mapper.py) and the data preflight at
the start of training: the mapper wrapper skips and counts, the counts reach the trainer's process
with 0 and 2 dataloader workers and RepeatFactorTrainingSampler, the fraction limit stops training
naming the files, a short train_net.py run survives a corrupt image and logs
data/skipped_images, and the preflight stops a run on an invalid dataset."""

import json
import os
import uuid

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.engine import default_argument_parser
from PIL import Image

import train_net
from longtail import add_longtail_config
from longtail.data import register_lvis_style_instances
from longtail.data.preflight import DatasetPreflightError
from longtail.data.robust_mapper import (
    SKIPPED_KEY,
    SkipCountingLoader,
    SkipUnreadableMapper,
    UnreadableImagesError,
    over_limit,
)
from longtail.engine import LongTailTrainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO, "configs", "quick_schedules", "ce_instant_test.yaml")
SIZE = 64


def _corrupt(path):
    with open(path, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 truncated jpeg")


def _dataset(tmp_path, num_images=4, segmentation=None):
    """``num_images`` SIZE x SIZE pngs with one square each (2 categories); returns
    (json file, image root, image paths)."""
    root = tmp_path / "images"
    root.mkdir()
    square = [8.0, 8.0, 40.0, 8.0, 40.0, 40.0, 8.0, 40.0]
    images, anns, paths = [], [], []
    for i in range(1, num_images + 1):
        path = root / f"{i}.png"
        Image.new("RGB", (SIZE, SIZE), (40 * i % 255, 100, 160)).save(path)
        paths.append(str(path))
        images.append({"id": i, "file_name": f"{i}.png", "height": SIZE, "width": SIZE})
        anns.append({"id": 100 + i, "image_id": i, "category_id": 1 + i % 2,
                     "bbox": [8.0, 8.0, 32.0, 32.0], "area": 1024.0,
                     "segmentation": [square] if segmentation is None else segmentation})
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    json_file = tmp_path / "train.json"
    json_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return str(json_file), str(root), paths


@pytest.fixture
def dataset_name():
    name = f"test_skip_unreadable_{uuid.uuid4().hex[:8]}"
    yield name
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)


def _cfg(dataset_name=None, **overrides):
    cfg = get_cfg()
    add_longtail_config(cfg)
    cfg.merge_from_file(QUICK)
    cfg.INPUT.MIN_SIZE_TRAIN = (SIZE,)
    cfg.INPUT.MAX_SIZE_TRAIN = SIZE
    if dataset_name:
        cfg.DATASETS.TRAIN = (dataset_name,)
    for key, value in overrides.items():
        node, *path, leaf = key.split("__")
        target = getattr(cfg, node)
        for p in path:
            target = getattr(target, p)
        setattr(target, leaf, value)
    return cfg


def _record(path, height=SIZE):
    return {"file_name": path, "image_id": os.path.basename(path), "height": height,
            "width": SIZE, "annotations": []}


# ---- the mapper wrapper ------------------------------------------------------------------------
def test_mapper_skips_unreadable_images_and_passes_them_on(tmp_path):
    _, root, paths = _dataset(tmp_path)
    _corrupt(paths[1])
    os.remove(paths[2])
    mapper = SkipUnreadableMapper(DatasetMapper(_cfg(), is_train=True), 0.9, min_reads=10)

    first = mapper(_record(paths[0]))
    assert first["image"].shape[-2:] == (SIZE, SIZE) and SKIPPED_KEY not in first
    assert mapper(_record(paths[1])) is None  # undecodable
    assert mapper(_record(paths[2])) is None  # missing
    assert mapper(_record(paths[3], height=SIZE + 1)) is None  # not the recorded size
    after = mapper(_record(paths[0]))
    assert after[SKIPPED_KEY] == [paths[1], paths[2], paths[3]]
    assert SKIPPED_KEY not in mapper(_record(paths[0]))  # each skip is passed on once
    assert mapper.num_read == 6 and len(mapper.skipped_files) == 3


def test_mapper_reraises_failures_of_readable_images(tmp_path):
    _, _, paths = _dataset(tmp_path, num_images=1)

    def broken_mapper(dataset_dict):
        raise ValueError("a bug in an augmentation")

    mapper = SkipUnreadableMapper(broken_mapper, 0.9)
    with pytest.raises(ValueError, match="a bug in an augmentation"):
        mapper(_record(paths[0]))
    assert mapper.skipped_files == []


def test_limit_rule_judges_on_at_least_min_reads():
    # 1%: the first bad images cannot stop a run; 11 skips in the first 1000 reads can
    assert not over_limit(1, 1, 0.01)
    assert not over_limit(10, 10, 0.01)
    assert over_limit(11, 11, 0.01)
    assert not over_limit(15, 2000, 0.01) and over_limit(21, 2000, 0.01)
    assert over_limit(1, 5000, 0.0) and not over_limit(0, 5000, 0.0)  # 0: any skip stops


def test_counting_loader_pops_counts_and_stops_naming_the_files():
    batches = [
        [{"image": 0}, {"image": 1, SKIPPED_KEY: ["bad/a.jpg"]}],
        [{"image": 2}, {"image": 3}],
        [{"image": 4, SKIPPED_KEY: ["bad/b.jpg", "bad/a.jpg"]}, {"image": 5}],
    ]
    loader = SkipCountingLoader(batches, 0.25, min_reads=4, dataset_names=("my_train",))
    it = iter(loader)
    assert next(it) == [{"image": 0}, {"image": 1}]  # the key never reaches the model
    assert (loader.num_skipped, loader.num_read) == (1, 3)  # 1 <= 0.25 * max(3, 4)
    next(it)
    with pytest.raises(UnreadableImagesError) as err:
        next(it)  # 3 skipped of 9 read (4 + 2 images, 3 skips) > 0.25 * 9
    message = str(err.value)
    assert "3 of 9 training images" in message and "MAX_SKIPPED_FRACTION = 0.25" in message
    assert "bad/a.jpg" in message and "bad/b.jpg" in message and "2 file(s)" in message
    assert "python -m longtail.tools.check_dataset --dataset my_train --full" in message


# ---- through detectron2's train loader ---------------------------------------------------------
@pytest.mark.parametrize("workers, sampler", [(0, "TrainingSampler"),
                                              (2, "RepeatFactorTrainingSampler")])
def test_train_loader_skips_and_counts_across_workers(tmp_path, dataset_name, workers, sampler):
    json_file, root, paths = _dataset(tmp_path)
    _corrupt(paths[0])
    _corrupt(paths[3])
    register_lvis_style_instances(dataset_name, json_file, root)
    cfg = _cfg(dataset_name, DATALOADER__NUM_WORKERS=workers, DATALOADER__SAMPLER_TRAIN=sampler,
               MODEL__LONGTAIL__DATA__MAX_SKIPPED_FRACTION=0.9)
    loader = LongTailTrainer.build_train_loader(cfg)
    assert isinstance(loader, SkipCountingLoader)
    seen = []
    for _, batch in zip(range(10), loader):
        assert all(SKIPPED_KEY not in d for d in batch)
        seen += [d["file_name"] for d in batch]
    assert set(seen) <= {paths[1], paths[2]}
    # half the images are corrupt: 20 good reads come with skips, all of the corrupt files
    assert loader.num_skipped >= 1 and set(loader.skipped_files) <= {paths[0], paths[3]}
    assert loader.num_read == len(seen) + loader.num_skipped


def test_a_worker_that_only_fails_stops_with_the_files(tmp_path, dataset_name):
    """Every read fails (a lost mount): the worker itself stops instead of retrying forever."""
    json_file, root, paths = _dataset(tmp_path)
    for path in paths:
        _corrupt(path)
    register_lvis_style_instances(dataset_name, json_file, root)
    cfg = _cfg(dataset_name, DATALOADER__NUM_WORKERS=1,
               MODEL__LONGTAIL__DATA__MAX_SKIPPED_FRACTION=0.001)
    with pytest.raises(UnreadableImagesError, match=r"could not be read.*\n.*\.png"):
        next(iter(LongTailTrainer.build_train_loader(cfg)))


# ---- end to end through train_net.py -----------------------------------------------------------
def _train_args(out, dataset_name, *opts):
    return default_argument_parser().parse_args([
        "--config-file", QUICK, "OUTPUT_DIR", str(out),
        "DATASETS.TRAIN", f"('{dataset_name}',)", "DATASETS.TEST", "()",
        "MODEL.ROI_HEADS.NUM_CLASSES", "2", "INPUT.MIN_SIZE_TRAIN", f"({SIZE},)",
        "INPUT.MAX_SIZE_TRAIN", str(SIZE), "SOLVER.MAX_ITER", "5", *opts,
    ])


def test_training_survives_a_corrupt_image(tmp_path, dataset_name):
    json_file, root, paths = _dataset(tmp_path, num_images=3)
    _corrupt(paths[1])
    register_lvis_style_instances(dataset_name, json_file, root)
    out = tmp_path / "run"
    train_net.main(_train_args(out, dataset_name, "DATALOADER.NUM_WORKERS", "1",
                               "DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler"))
    assert torch.load(out / "model_final.pth")["iteration"] == 4
    with open(out / "metrics.json") as f:
        records = [json.loads(line) for line in f if line.strip()]
    assert records and all("data/skipped_images" in r for r in records)
    # 10 reads of 3 images (seeded): the corrupt one was met, and training went on
    assert records[-1]["data/skipped_images"] >= 1


def test_preflight_stops_training_on_an_invalid_dataset(tmp_path, dataset_name):
    json_file, root, _ = _dataset(tmp_path, segmentation=[[8.0, 8.0, 40.0, 8.0, 40.0]])
    register_lvis_style_instances(dataset_name, json_file, root)
    out = tmp_path / "run"
    with pytest.raises(DatasetPreflightError) as err:
        train_net.main(_train_args(out, dataset_name))
    message = str(err.value)
    assert "degenerate_polygon: 4" in message and "annotation #0 of image 1" in message
    assert "polygon 0 has 5 coordinates" in message
    assert f"python -m longtail.tools.check_dataset --dataset {dataset_name}" in message
    assert not os.path.exists(out / "model_final.pth")


def test_full_preflight_finds_the_corrupt_image(tmp_path, dataset_name):
    json_file, root, paths = _dataset(tmp_path, num_images=2)
    _corrupt(paths[1])
    register_lvis_style_instances(dataset_name, json_file, root)
    with pytest.raises(DatasetPreflightError, match="unreadable_image: 1") as err:
        train_net.main(_train_args(tmp_path / "run", dataset_name,
                                   "MODEL.LONGTAIL.DATA.PREFLIGHT", "full"))
    assert paths[1] in str(err.value)
