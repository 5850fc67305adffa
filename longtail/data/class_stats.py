"""Per-class training statistics: instance count, image count, r/c/f group, number of images.

Every method that re-weights classes needs these (BAGS groups by instance count, IIF by image
frequency, ECM and LDA by instance count). They come from one of two places:

* the training dataset dicts of ``DATASETS.TRAIN`` (computed once, on the main rank, and broadcast so
  that every rank holds identical numbers), or
* a json in LVIS ``categories`` form (``MODEL.LONGTAIL.CLASS_STATS_PATH``): a full LVIS annotation
  json, or ``{"num_images": N, "categories": [{"id", "name", "image_count", "instance_count",
  "frequency"?}, ...]}`` as this module writes it.

Index k of every list is the contiguous class id k used by the model.
"""
import json
import logging
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils import comm

from .json_io import read_json_object

logger = logging.getLogger(__name__)

__all__ = ["ClassStats", "frequency_group", "load_class_stats"]

# LVIS's rule, by the number of training images a class appears in (Gupta et al. 2019, Sec. 4):
# rare 1-10, common 11-100, frequent >100. A class with no training image counts as rare.
RARE_MAX_IMAGES = 10
COMMON_MAX_IMAGES = 100


def frequency_group(image_count: int) -> str:
    """The LVIS frequency group ('r', 'c' or 'f') of a class seen in ``image_count`` images."""
    if image_count <= RARE_MAX_IMAGES:
        return "r"
    if image_count <= COMMON_MAX_IMAGES:
        return "c"
    return "f"


@dataclass(frozen=True)
class ClassStats:
    """Training statistics of K classes, indexed by contiguous class id."""

    names: Tuple[str, ...]
    instance_count: Tuple[int, ...]
    image_count: Tuple[int, ...]
    frequency: Tuple[str, ...]
    num_images: int

    def __post_init__(self):
        k = len(self.names)
        if not (len(self.instance_count) == len(self.image_count) == len(self.frequency) == k):
            raise ValueError("ClassStats: names, counts and frequency must have one entry per class")
        bad = sorted(set(self.frequency) - {"r", "c", "f"})
        if bad:
            raise ValueError(f"ClassStats: frequency must be one of 'r', 'c', 'f', got {bad}")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def counts(self, count_type: str) -> Tuple[int, ...]:
        """The per-class ``"instance"`` or ``"image"`` counts (a method's COUNT_TYPE key)."""
        by_type = {"instance": self.instance_count, "image": self.image_count}
        if count_type not in by_type:
            raise ValueError(f"COUNT_TYPE must be 'instance' or 'image', got {count_type!r}")
        return by_type[count_type]

    def group_counts(self) -> Dict[str, int]:
        """Number of classes in each of the r/c/f groups."""
        return {g: sum(f == g for f in self.frequency) for g in "rcf"}

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dataset_dicts(cls, dataset_dicts: Iterable[dict], class_names: Sequence[str]):
        """Count instances and images per class in detectron2 dataset dicts.

        Args:
            dataset_dicts: dicts in detectron2's standard format; ``annotations[i]["category_id"]``
                is a contiguous id in [0, K).
            class_names: the K class names (``thing_classes``).
        """
        num_classes = len(class_names)
        instances = [0] * num_classes
        images = [0] * num_classes
        num_images = 0
        for record in dataset_dicts:
            num_images += 1
            seen = set()
            for ann in record.get("annotations", []):
                c = ann["category_id"]
                if not 0 <= c < num_classes:
                    raise ValueError(
                        f"Annotation {ann.get('id', '?')} of image {record.get('file_name')} has "
                        f"category id {c}, outside the {num_classes} classes of the dataset. Check "
                        "the annotation json's category ids against its `categories` list."
                    )
                instances[c] += 1
                seen.add(c)
            for c in seen:
                images[c] += 1
        return cls(
            names=tuple(class_names),
            instance_count=tuple(instances),
            image_count=tuple(images),
            frequency=tuple(frequency_group(n) for n in images),
            num_images=num_images,
        )

    @classmethod
    def from_json(cls, path: str):
        """Read statistics from a json in LVIS ``categories`` form (see the module docstring).

        Categories are sorted by id; contiguous id k is the k-th. A missing ``frequency`` is
        derived from ``image_count`` with the LVIS rule.
        """
        data = read_json_object(
            path,
            "Class statistics file",
            "Point MODEL.LONGTAIL.CLASS_STATS_PATH at an LVIS-format json, or leave it empty to "
            "compute the statistics from DATASETS.TRAIN.",
        )
        needs = (
            "it needs `categories` (a list with `id`, `name`, `image_count` and `instance_count` "
            "per category) and either `num_images` or an `images` list"
        )
        if not isinstance(data.get("categories"), list):
            raise ValueError(f"Class statistics file {path!r} has no `categories` list: {needs}.")
        try:
            cats = sorted(data["categories"], key=lambda c: c["id"])
            if "num_images" in data:
                num_images = int(data["num_images"])
            elif "images" in data:
                num_images = len(data["images"])
            else:
                raise KeyError("num_images")
            image_count = tuple(int(c["image_count"]) for c in cats)
            instance_count = tuple(int(c["instance_count"]) for c in cats)
            names = tuple(str(c["name"]) for c in cats)
        except KeyError as e:
            raise ValueError(f"Class statistics file {path!r} lacks {e}: {needs}.") from e
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"Class statistics file {path!r} has an unexpected structure ({e}): {needs}."
            ) from e
        frequency = tuple(c.get("frequency") or frequency_group(n) for c, n in zip(cats, image_count))
        bad = sorted({f for f in frequency if f not in ("r", "c", "f")})
        if bad:
            raise ValueError(
                f"Class statistics file {path!r} has `frequency` values {bad}; use 'r', 'c' or "
                "'f', or leave the field out to derive it from `image_count`."
            )
        return cls(names, instance_count, image_count, frequency, num_images)

    def to_json(self, path: str) -> None:
        """Write the statistics in the form :meth:`from_json` reads (ids are k + 1)."""
        data = {
            "num_images": self.num_images,
            "categories": [
                {
                    "id": k + 1,
                    "name": self.names[k],
                    "frequency": self.frequency[k],
                    "image_count": self.image_count[k],
                    "instance_count": self.instance_count[k],
                }
                for k in range(self.num_classes)
            ],
        }
        with open(path, "w") as f:
            json.dump(data, f, indent=1)


def _stats_from_datasets(
    dataset_names: Sequence[str], loaded: Mapping[str, list]
) -> ClassStats:
    names: Optional[List[str]] = None
    dicts: List[dict] = []
    for name in dataset_names:
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is None:
            raise ValueError(f"Dataset {name!r} has no `thing_classes` in its metadata.")
        if names is not None and list(classes) != names:
            raise ValueError(f"DATASETS.TRAIN {list(dataset_names)} do not share one class list.")
        names = list(classes)
        dicts.extend(loaded[name] if name in loaded else DatasetCatalog.get(name))
    return ClassStats.from_dataset_dicts(dicts, names)


_CACHE: Dict[tuple, ClassStats] = {}


def load_class_stats(cfg, dataset_dicts: Optional[Mapping[str, list]] = None) -> ClassStats:
    """The class statistics that ``cfg`` asks for, identical on every rank.

    Reads ``MODEL.LONGTAIL.CLASS_STATS_PATH`` when set, else counts ``DATASETS.TRAIN`` on the main
    rank and broadcasts the result. Results are cached per process, so the model, the hooks and the
    evaluator share one copy. In a multi-process run every rank must call this (the first time)
    because of the broadcast.

    ``dataset_dicts`` (name -> dicts, e.g. what the data preflight loaded) are counted instead of
    loading those datasets again.
    """
    path = cfg.MODEL.LONGTAIL.CLASS_STATS_PATH
    key = (path, tuple(cfg.DATASETS.TRAIN), cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    if key in _CACHE:
        return _CACHE[key]
    if path:
        stats = ClassStats.from_json(path)
        source = path
    else:
        stats = (
            _stats_from_datasets(cfg.DATASETS.TRAIN, dataset_dicts or {})
            if comm.is_main_process()
            else None
        )
        if comm.get_world_size() > 1:
            stats = comm.all_gather(stats)[0]
        source = f"DATASETS.TRAIN {list(cfg.DATASETS.TRAIN)}"
    if stats.num_classes != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        raise ValueError(
            f"Class statistics from {source} have {stats.num_classes} classes but "
            f"MODEL.ROI_HEADS.NUM_CLASSES is {cfg.MODEL.ROI_HEADS.NUM_CLASSES}; set one to match "
            "the other."
        )
    logger.info(
        "Class statistics from %s: %d classes (r/c/f = %s), %d training images",
        source, stats.num_classes, "/".join(str(v) for v in stats.group_counts().values()),
        stats.num_images,
    )
    _CACHE[key] = stats
    return stats
