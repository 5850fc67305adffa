"""Dataset registration: the built-in shapes-lt, and LVIS-format datasets of one's own.

LVIS v0.5/v1 themselves (``lvis_v1_train``, ``lvis_v1_val``, ...) are registered by detectron2
when ``detectron2.data`` is imported, under ``$DETECTRON2_DATASETS/{lvis,coco}``; nothing here
re-registers them.
"""
import logging
import os
from typing import List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from . import shapes_lt
from .json_io import read_json_object

logger = logging.getLogger(__name__)

__all__ = ["load_lvis_style_json", "register_lvis_style_instances", "register_shapes_lt"]

SHAPES_LT_SPLITS = {
    "shapes_lt_train": "train",
    "shapes_lt_val": "val",
    "shapes_lt_val_mini": "val_mini",
}


def _datasets_root() -> str:
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def _read_json(json_file: str, what: str) -> dict:
    data = read_json_object(
        json_file,
        f"{what}: annotation file",
        "See datasets/README.md for the expected layout, or set DETECTRON2_DATASETS to the folder "
        "that holds it.",
    )
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(
                f"{what}: annotation file {json_file!r} has no `{key}` list; an LVIS/COCO-format "
                "json needs `images`, `annotations` and `categories`."
            )
    return data


def load_lvis_style_json(json_file: str, image_root: str, dataset_name: str) -> List[dict]:
    """Load an LVIS-format json into detectron2 dataset dicts, checking it on the way.

    Category ids are mapped to contiguous ids in sorted-id order; ``neg_category_ids`` and
    ``not_exhaustive_category_ids`` stay dataset ids, as in detectron2's own LVIS loader.
    An image is found at ``image_root/file_name`` (or, for LVIS's own jsons, from ``coco_url``).

    Raises:
        FileNotFoundError / ValueError: naming the file, image or annotation at fault.
    """
    data = _read_json(json_file, dataset_name)
    cat_ids = sorted(c["id"] for c in data["categories"])
    contiguous = {cid: k for k, cid in enumerate(cat_ids)}
    anns_by_image = {}
    known = f"ids {cat_ids[0]}..{cat_ids[-1]}" if cat_ids else "the list is empty"
    for ann in data["annotations"]:
        cid = ann.get("category_id")
        if cid not in contiguous:
            raise ValueError(
                f"{dataset_name}: annotation {ann.get('id')} (image {ann.get('image_id')}) in "
                f"{json_file!r} has category_id {cid!r}, which is not in its `categories` "
                f"({known}). Fix the annotation or add the category."
            )
        anns_by_image.setdefault(ann["image_id"], []).append(ann)
    image_ids = {img["id"] for img in data["images"]}
    orphans = sorted(set(anns_by_image) - image_ids)
    if orphans:
        raise ValueError(
            f"{dataset_name}: {json_file!r} has annotations of image ids {orphans[:5]} that are not "
            "in its `images` list."
        )

    dicts, missing = [], []
    for img in sorted(data["images"], key=lambda i: i["id"]):
        if "file_name" in img:
            file_name = os.path.join(image_root, img["file_name"])
        else:  # LVIS: the split folder and file come from the COCO url
            file_name = os.path.join(image_root, *img["coco_url"].split("/")[-2:])
        if not os.path.isfile(file_name):
            missing.append(file_name)
        record = {
            "file_name": file_name,
            "image_id": img["id"],
            "height": img["height"],
            "width": img["width"],
            "neg_category_ids": img.get("neg_category_ids", []),
            "not_exhaustive_category_ids": img.get("not_exhaustive_category_ids", []),
            "annotations": [
                {
                    "bbox": ann["bbox"],
                    "bbox_mode": BoxMode.XYWH_ABS,
                    "category_id": contiguous[ann["category_id"]],
                    "segmentation": ann["segmentation"],
                }
                for ann in anns_by_image.get(img["id"], [])
            ],
        }
        dicts.append(record)
    if missing:
        raise FileNotFoundError(
            f"{dataset_name}: {len(missing)} of {len(dicts)} images listed in {json_file!r} are "
            f"missing, e.g. {missing[:3]}. Check the image root {image_root!r}."
        )
    logger.info("Loaded %d images of %s from %s", len(dicts), dataset_name, json_file)
    return dicts


def register_lvis_style_instances(
    name: str, json_file: str, image_root: str, metadata: Optional[dict] = None
) -> None:
    """Register an LVIS-format dataset (e.g. a custom subset) for training and evaluation.

    ``thing_classes`` and ``class_image_count`` (for the federated loss) are read from the json's
    categories now, because the model is built before any dataset is loaded.
    """
    if name in DatasetCatalog.list():
        raise ValueError(f"A dataset named {name!r} is already registered; pick another name.")
    cats = sorted(_read_json(json_file, name)["categories"], key=lambda c: c["id"])
    loader = lambda: load_lvis_style_json(json_file, image_root, name)  # noqa: E731
    _register(name, loader, json_file, image_root, cats, metadata or {})


def _register(name, loader, json_file, image_root, cats, metadata):
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(
        json_file=json_file,
        image_root=image_root,
        evaluator_type="lvis",
        thing_classes=[c["name"] for c in cats],
        thing_dataset_id_to_contiguous_id={c["id"]: k for k, c in enumerate(cats)},
        class_image_count=[{"id": c["id"], "image_count": c.get("image_count", 0)} for c in cats],
        **metadata,
    )


def register_shapes_lt(root: Optional[str] = None, spec=shapes_lt.ShapesLTSpec()) -> None:
    """Register ``shapes_lt_train``, ``shapes_lt_val`` and ``shapes_lt_val_mini`` (idempotent).

    Nothing is generated here: the images are drawn the first time a split is loaded, under
    ``$DETECTRON2_DATASETS/shapes_lt`` (default ``datasets/shapes_lt``). The category statistics
    are computed from the seed, so the metadata is complete before generation.
    """
    folder = os.path.join(root or _datasets_root(), "shapes_lt")
    cats = shapes_lt.categories(spec)
    for name, split in SHAPES_LT_SPLITS.items():
        if name in DatasetCatalog.list():
            continue
        json_file = os.path.join(folder, f"{split}.json")

        def load(name=name, json_file=json_file):
            shapes_lt.ensure_shapes_lt(folder, spec)
            return load_lvis_style_json(json_file, folder, name)

        _register(name, load, json_file, folder, cats, {})
