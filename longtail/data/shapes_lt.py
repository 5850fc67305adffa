"""shapes-lt: a small long-tailed instance-segmentation dataset, generated locally from a seed.

30 categories = 5 shapes x 6 colours. Colours come in near pairs (red/orange, yellow/green,
blue/purple), every instance gets colour and size jitter, and a third of the instances carry a
stripe texture that is shared by all classes, so a classifier has to look closely: a detector trained
on the long tail is pulled toward the frequent member of each confusable pair.

* train: class k (in a seeded random order of rank r) gets round(400 * 0.8**r) instances (at least
  one), 1-3 objects per image, so the LVIS rule on image counts (rare 1-10, common 11-100,
  frequent >100) puts classes in all three groups;
* val: 30 instances of every class, so that APr averages hundreds of instances; val_mini: its
  first 48 images, for quick checks.

Annotations are exhaustive, so every category absent from a val image is listed in its
``neg_category_ids`` (false positives on it count) and ``not_exhaustive_category_ids`` is empty.
The files are LVIS v1 json (polygon masks, ``frequency``, ``image_count``, ``instance_count``,
both image-level lists) and PNG images. Which classes go into which image (the *plan*) is a cheap
function of the seed, so category statistics are known before any image is drawn.
"""
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from .class_stats import frequency_group

logger = logging.getLogger(__name__)

__all__ = ["ShapesLTSpec", "CATEGORY_NAMES", "plan_counts", "categories", "ensure_shapes_lt"]

# Bump when a change to this file changes the generated data; an existing folder made by another
# version is refused rather than silently mixed with new code.
GENERATOR_VERSION = 1

SHAPES = ("circle", "square", "triangle", "diamond", "star")
# RGB; neighbours in this list are deliberately close in hue.
COLOURS = {
    "red": (215, 45, 45),
    "orange": (230, 120, 35),
    "yellow": (225, 205, 45),
    "green": (70, 175, 60),
    "blue": (45, 85, 215),
    "purple": (135, 65, 200),
}
CATEGORY_NAMES = tuple(f"{c}_{s}" for s in SHAPES for c in COLOURS)
# val_mini.json: the first images of val, for evaluations that must take seconds (tests).
VAL_MINI_IMAGES = 48


@dataclass(frozen=True)
class ShapesLTSpec:
    """What to generate. The defaults are the dataset the demo, tests and benchmarks use."""

    seed: int = 0
    image_size: int = 128
    head_instances: int = 400  # instances of the most frequent class
    decay: float = 0.8  # class of rank r gets head_instances * decay**r
    max_objects: int = 3  # objects per image, drawn uniformly from 1..max_objects
    val_instances_per_class: int = 30
    min_object_size: int = 14  # pixels, side of the shape's bounding square
    max_object_size: int = 44


def plan_counts(spec: ShapesLTSpec) -> np.ndarray:
    """Training instances per class, (K,) int, in CATEGORY_NAMES order."""
    rank_of_class = np.random.default_rng([spec.seed, 0]).permutation(len(CATEGORY_NAMES))
    counts = np.round(spec.head_instances * spec.decay ** rank_of_class.astype(np.float64))
    return np.maximum(counts, 1).astype(np.int64)


def _plan_images(counts: Sequence[int], max_objects: int, rng) -> List[np.ndarray]:
    """Shuffle the instance labels and cut them into images of 1..max_objects objects."""
    labels = np.repeat(np.arange(len(counts)), counts)
    rng.shuffle(labels)
    images, start = [], 0
    while start < len(labels):
        n = int(rng.integers(1, max_objects + 1))
        images.append(labels[start : start + n])
        start += n
    return images


def _plans(spec: ShapesLTSpec) -> Dict[str, List[np.ndarray]]:
    k = len(CATEGORY_NAMES)
    return {
        "train": _plan_images(plan_counts(spec), spec.max_objects, np.random.default_rng([spec.seed, 1])),
        "val": _plan_images(
            [spec.val_instances_per_class] * k, spec.max_objects, np.random.default_rng([spec.seed, 2])
        ),
    }


def categories(spec: ShapesLTSpec = ShapesLTSpec()) -> List[dict]:
    """LVIS ``categories`` entries with the *training* statistics (as LVIS's own jsons carry)."""
    train = _plans(spec)["train"]
    instance_count = np.bincount(np.concatenate(train), minlength=len(CATEGORY_NAMES))
    image_count = np.zeros(len(CATEGORY_NAMES), dtype=np.int64)
    for labels in train:
        image_count[np.unique(labels)] += 1
    return [
        {
            "id": k + 1,
            "name": name,
            "synset": name,
            "def": name.replace("_", " "),
            "frequency": frequency_group(int(image_count[k])),
            "image_count": int(image_count[k]),
            "instance_count": int(instance_count[k]),
        }
        for k, name in enumerate(CATEGORY_NAMES)
    ]


# ---- drawing -----------------------------------------------------------------------------------
def _shape_polygon(shape: str, cx: float, cy: float, size: float, rng) -> np.ndarray:
    """(V, 2) float vertices of one shape whose bounding square has side ``size``."""
    r = size / 2.0
    tilt = rng.uniform(-0.25, 0.25)  # radians; small, so a square never becomes a diamond
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif shape == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * r * 0.8
    elif shape == "triangle":
        t = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif shape == "diamond":  # a tall rhombus
        pts = np.array([[0, -1], [0.6, 0], [0, 1], [-0.6, 0]], np.float64) * r
    elif shape == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45) * r
        pts = np.stack([np.cos(t) * rad, np.sin(t) * rad], 1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    rot = np.array([[np.cos(tilt), -np.sin(tilt)], [np.sin(tilt), np.cos(tilt)]])
    return pts @ rot.T + np.array([cx, cy])


def _background(size: int, rng) -> np.ndarray:
    """A grey, noisy background with a random low-frequency tint, (H, W, 3) float."""
    base = rng.uniform(90, 160)
    yy, xx = np.mgrid[0:size, 0:size] / size
    tint = rng.uniform(-25, 25, size=3)
    gradient = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))[..., None] * tint
    return base + gradient + rng.normal(0, 10, size=(size, size, 3))


def _draw_image(labels: Sequence[int], spec: ShapesLTSpec, rng):
    """Draw one image; returns the (H, W, 3) uint8 RGB image and one polygon per object."""
    size = spec.image_size
    image = _background(size, rng)
    boxes, polygons = [], []
    for label in labels:
        shape = SHAPES[label // len(COLOURS)]
        colour = np.array(list(COLOURS.values())[label % len(COLOURS)], np.float64)
        # Objects do not overlap (2 px gap), so each polygon is exactly the visible mask.
        for _ in range(100):
            s = rng.uniform(spec.min_object_size, spec.max_object_size)
            cx, cy = rng.uniform(s / 2 + 1, size - s / 2 - 1, size=2)
            box = (cx - s / 2 - 2, cy - s / 2 - 2, cx + s / 2 + 2, cy + s / 2 + 2)
            if all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in boxes):
                break
        boxes.append(box)
        poly = _shape_polygon(shape, cx, cy, s, rng)
        polygons.append(poly)
        mask = np.zeros((size, size), np.uint8)
        cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 1)
        fill = colour * rng.uniform(0.85, 1.15, size=3)
        if rng.random() < 1 / 3:  # stripes shared by all classes: a texture nuisance
            angle = rng.uniform(0, np.pi)
            yy, xx = np.mgrid[0:size, 0:size]
            phase = (xx * np.cos(angle) + yy * np.sin(angle)) / rng.uniform(3, 6)
            fill = fill * np.where(np.floor(phase) % 2 == 0, 1.0, 0.7)[..., None]
        image = np.where(mask[..., None] > 0, fill, image)
    image = image + rng.normal(0, 6, size=image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), polygons


def _annotation(ann_id: int, image_id: int, label: int, poly: np.ndarray, size: int) -> dict:
    flat = [round(float(v), 2) for v in poly.reshape(-1)]
    rle = mask_utils.merge(mask_utils.frPyObjects([flat], size, size))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": int(label) + 1,
        "segmentation": [flat],
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
    }


def _write_split(split: str, plan: List[np.ndarray], spec: ShapesLTSpec, cats, out_dir, id_base):
    k = len(CATEGORY_NAMES)
    os.makedirs(os.path.join(out_dir, split))
    images, annotations = [], []
    for i, labels in enumerate(plan):
        image_id = id_base + i + 1
        rng = np.random.default_rng([spec.seed, 3, image_id])
        pixels, polygons = _draw_image(labels, spec, rng)
        file_name = f"{split}/{image_id:06d}.png"
        cv2.imwrite(os.path.join(out_dir, file_name), cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
        present = set(int(c) for c in labels)
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": spec.image_size,
                "height": spec.image_size,
                "neg_category_ids": [c + 1 for c in range(k) if c not in present],
                "not_exhaustive_category_ids": [],
            }
        )
        for label, poly in zip(labels, polygons):
            ann_id = id_base + len(annotations) + 1
            annotations.append(_annotation(ann_id, image_id, label, poly, spec.image_size))
    data = {
        "info": {"description": "shapes-lt", "generator_version": GENERATOR_VERSION, "spec": asdict(spec)},
        "images": images,
        "annotations": annotations,
        "categories": cats,
    }
    with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
        json.dump(data, f)
    return data


def _write_subset(data: dict, num_images: int, path: str) -> None:
    """The first ``num_images`` images of a split with their annotations (quick evaluations)."""
    images = data["images"][:num_images]
    keep = {img["id"] for img in images}
    subset = dict(data, images=images, annotations=[a for a in data["annotations"] if a["image_id"] in keep])
    with open(path, "w") as f:
        json.dump(subset, f)


def _is_complete(root: str, spec: ShapesLTSpec) -> bool:
    info_path = os.path.join(root, "info.json")
    if not os.path.isfile(info_path):
        return False
    with open(info_path) as f:
        info = json.load(f)
    expected = {"generator_version": GENERATOR_VERSION, "spec": asdict(spec)}
    if info != expected:
        raise RuntimeError(
            f"{root} holds shapes-lt made with different settings ({info}); this code makes "
            f"{expected}. Delete the folder (it is regenerated in seconds) or point "
            "DETECTRON2_DATASETS elsewhere."
        )
    return True


def ensure_shapes_lt(root: str, spec: ShapesLTSpec = ShapesLTSpec()) -> str:
    """Generate shapes-lt into ``root`` unless it is already there; returns ``root``.

    Files are written to a temporary sibling folder and moved into place in one rename, so that
    concurrent processes (one per rank) never see a half-written dataset and never clobber each
    other.
    """
    if _is_complete(root, spec):
        return root
    # A second look: another rank may have finished its copy since the first.
    if os.path.exists(root) and os.listdir(root) and not _is_complete(root, spec):
        raise RuntimeError(
            f"{root} exists but is not a complete shapes-lt folder (no info.json). Move or delete "
            "it, or point DETECTRON2_DATASETS elsewhere; it is never overwritten."
        )
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".shapes_lt-", dir=parent)
    try:
        cats = categories(spec)
        plans = _plans(spec)
        logger.info("Generating shapes-lt into %s ...", root)
        _write_split("train", plans["train"], spec, cats, tmp, id_base=0)
        val = _write_split("val", plans["val"], spec, cats, tmp, id_base=100000)
        _write_subset(val, VAL_MINI_IMAGES, os.path.join(tmp, "val_mini.json"))
        with open(os.path.join(tmp, "info.json"), "w") as f:
            json.dump({"generator_version": GENERATOR_VERSION, "spec": asdict(spec)}, f)
        try:
            os.rename(tmp, root)
        except OSError:
            if not _is_complete(root, spec):  # not another rank's finished copy: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
