"""Detectron2 evaluator running the LVIS protocol on faster-coco-eval.

Drop-in replacement for ``detectron2.evaluation.LVISEvaluator``: same inputs, same metric keys
(x100), but NaN instead of -100 for empty groups, BAGS bins AP1..AP4 when training instance counts
are given, per-class json output, optionally AP^fixed (tasks ``bbox_fixed`` / ``segm_fixed``), and
no dependency on lvis-api's ``LVISEval`` (which crashes on numpy >= 1.24 and runs out of memory at
LVIS scale).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table

from .lvis_style import BIN_KEYS, evaluate_lvis_results

__all__ = ["LongTailLVISEvaluator"]

_TASKS = ("bbox", "segm")
#: Suffix of the AP^fixed tasks (``bbox_fixed``, ``segm_fixed``).
FIXED_SUFFIX = "_fixed"


class LongTailLVISEvaluator(DatasetEvaluator):
    """Evaluate instance detection / segmentation outputs with the LVIS protocol.

    Args:
        dataset_name: a dataset registered in ``MetadataCatalog`` whose metadata has ``json_file``
            (the LVIS-format ground truth).
        tasks: subset of ("bbox", "segm"); None infers them from the outputs ("segm" only when
            masks are predicted).
        distributed: gather predictions from all ranks to rank 0 before evaluating.
        output_dir: where to write ``instances_predictions.pth``, ``lvis_results.json`` and
            ``lvis_per_class_{task}.json``; None writes nothing.
        max_dets_per_image: per-image cap across classes (LVIS: 300).
        chunk_size: classes evaluated together (a memory knob; the numbers do not depend on it).
        train_instance_count: training instances per contiguous class id (index k is class k,
            as in ``ClassStats``); enables the bins AP1..AP4.
        train_image_count: training images per contiguous class id (per-class json only).
        ap_fixed: also report AP^fixed (Dave et al. 2021: no per-image cap, the top
            ``ap_fixed_topk`` results per class over the dataset) as tasks ``bbox_fixed`` /
            ``segm_fixed``, with the same metric keys and ``lvis_per_class_{task}_fixed.json``. It
            is a lower bound unless inference kept every detection (TEST.DETECTIONS_PER_IMAGE -1).
        ap_fixed_topk: K of AP^fixed (the paper's 10,000).
        instance_bins: report the bins AP1..AP4 (needs ``train_instance_count``); False leaves
            them out of the metrics (the per-class json keeps the counts and bins).
    """

    def __init__(
        self,
        dataset_name: str,
        tasks: Optional[Sequence[str]] = None,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        *,
        max_dets_per_image: int = 300,
        chunk_size: Optional[int] = 50,
        train_instance_count: Optional[Sequence[int]] = None,
        train_image_count: Optional[Sequence[int]] = None,
        ap_fixed: bool = False,
        ap_fixed_topk: int = 10000,
        instance_bins: bool = True,
    ):
        self._logger = logging.getLogger(__name__)
        if tasks is not None:
            unknown = set(tasks) - set(_TASKS)
            if unknown:
                raise ValueError(f"Unsupported tasks {sorted(unknown)}; use a subset of {_TASKS}.")
            tasks = tuple(t for t in _TASKS if t in tasks)
        self._tasks = tasks
        self._distributed = distributed
        self._output_dir = output_dir
        self._max_dets_per_image = max_dets_per_image
        self._chunk_size = chunk_size
        if ap_fixed and int(ap_fixed_topk) < 1:
            raise ValueError(f"ap_fixed_topk must be >= 1, got {ap_fixed_topk}")
        self._ap_fixed = bool(ap_fixed)
        self._ap_fixed_topk = int(ap_fixed_topk)
        self._instance_bins = bool(instance_bins)
        self._cpu_device = torch.device("cpu")

        metadata = MetadataCatalog.get(dataset_name)
        json_file = getattr(metadata, "json_file", None)
        if not json_file:
            raise ValueError(
                f"MetadataCatalog.get({dataset_name!r}) has no 'json_file': register the dataset "
                "with the path of its LVIS-format annotation json (e.g. register_lvis_instances)."
            )
        self._json_file = PathManager.get_local_path(json_file)
        # Model outputs use contiguous ids 0..K-1; the json uses dataset ids.
        id_map = getattr(metadata, "thing_dataset_id_to_contiguous_id", None)
        if id_map:
            self._contiguous_to_dataset = {v: k for k, v in id_map.items()}
        else:
            # detectron2's LVIS convention: dataset id = contiguous id + 1.
            self._contiguous_to_dataset = None
        self._train_instance_count = self._by_dataset_id(train_instance_count)
        self._train_image_count = self._by_dataset_id(train_image_count)
        self.reset()

    def _by_dataset_id(self, per_class: Optional[Sequence[int]]) -> Optional[Dict[int, int]]:
        """Re-key per-contiguous-class values by dataset category id, as the json uses."""
        if per_class is None:
            return None
        return {self._dataset_category_id(k): int(v) for k, v in enumerate(per_class)}

    def reset(self) -> None:
        self._predictions: List[Dict[str, Any]] = []
        # Remembers mask heads that produced no instance, for task inference.
        self._saw_masks = False

    def process(self, inputs: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]):
        """Convert one batch of model outputs to COCO-format results (contiguous class ids).

        Args:
            inputs: the model inputs, each with ``image_id``.
            outputs: the model outputs, each with ``instances`` (pred_boxes, scores, pred_classes,
                optionally pred_masks).
        """
        for inp, out in zip(inputs, outputs):
            if "instances" not in out:
                continue
            instances = out["instances"].to(self._cpu_device)
            self._saw_masks = self._saw_masks or instances.has("pred_masks")
            self._predictions.append(
                {
                    "image_id": inp["image_id"],
                    "instances": instances_to_coco_json(instances, inp["image_id"]),
                }
            )

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """Evaluate everything processed since the last ``reset()``.

        Returns:
            ``OrderedDict(task -> {metric: value x100})`` on the main process, {} elsewhere or
            when no prediction was received. Tasks are "bbox" / "segm", followed by
            "bbox_fixed" / "segm_fixed" when AP^fixed is on.
        """
        if self._distributed:
            comm.synchronize()
            gathered = comm.gather((self._predictions, self._saw_masks), dst=0)
            if not comm.is_main_process():
                return {}
            predictions = list(itertools.chain.from_iterable(p for p, _ in gathered))
            saw_masks = any(s for _, s in gathered)
        else:
            predictions, saw_masks = self._predictions, self._saw_masks

        if len(predictions) == 0:
            self._logger.warning("[LongTailLVISEvaluator] Did not receive valid predictions.")
            return {}

        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
            path = os.path.join(self._output_dir, "instances_predictions.pth")
            with PathManager.open(path, "wb") as f:
                torch.save(predictions, f)

        results = [dict(r) for p in predictions for r in p["instances"]]
        for result in results:
            result["category_id"] = self._dataset_category_id(result["category_id"])
        if self._output_dir:
            path = os.path.join(self._output_dir, "lvis_results.json")
            with PathManager.open(path, "w") as f:
                json.dump(results, f)

        tasks = self._tasks
        if tasks is None:
            has_masks = saw_masks or any("segmentation" in r for r in results)
            tasks = ("bbox", "segm") if has_masks else ("bbox",)

        with open(self._json_file) as f:
            gt = json.load(f)
        all_metrics: Dict[str, Dict[str, float]] = OrderedDict()
        # Standard LVIS AP first, then AP^fixed on the same results (which are never modified).
        runs = [(task, task, {"max_dets_per_image": self._max_dets_per_image}) for task in tasks]
        if self._ap_fixed:
            fixed = {"max_dets_per_image": -1, "max_dets_per_class": self._ap_fixed_topk}
            runs += [(task + FIXED_SUFFIX, task, fixed) for task in tasks]
        for name, task, caps in runs:
            outcome = evaluate_lvis_results(
                gt,
                results,
                task,
                chunk_size=self._chunk_size,
                train_instance_count=self._train_instance_count,
                train_image_count=self._train_image_count,
                **caps,
            )
            metrics = outcome.metrics
            if not self._instance_bins:
                metrics = {k: v for k, v in metrics.items() if k not in BIN_KEYS}
            all_metrics[name] = metrics
            if name == task:
                title = f"{task} (LVIS protocol, x100)"
            else:
                title = f"{name} (AP^fixed, top {self._ap_fixed_topk} per class, x100)"
            self._logger.info("Evaluation results for %s: \n%s", title, create_small_table(metrics))
            if self._output_dir:
                path = os.path.join(self._output_dir, f"lvis_per_class_{name}.json")
                with PathManager.open(path, "w") as f:
                    json.dump(outcome.per_class, f, indent=1)
        return all_metrics

    def _dataset_category_id(self, contiguous_id: int) -> int:
        """Map a contiguous class index to the dataset category id."""
        if self._contiguous_to_dataset is None:
            return int(contiguous_id) + 1
        return self._contiguous_to_dataset[int(contiguous_id)]
