"""BAGS: Balanced Group Softmax (Li et al., CVPR 2020). Math: ``functional/bags.py``."""
import logging
from typing import Sequence

import torch
from detectron2.config import configurable
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ...data import load_class_stats
from ...functional.bags import DEFAULT_BIN_EDGES, bags_layout, bags_loss, bags_partition, bags_probs
from .base import LongTailOutputLayers
from .build import LONGTAIL_PREDICTOR_REGISTRY

logger = logging.getLogger(__name__)

__all__ = ["BAGSOutputLayers"]


@LONGTAIL_PREDICTOR_REGISTRY.register()
class BAGSOutputLayers(LongTailOutputLayers):
    """One softmax per group of classes of similar training instance count, each with an
    "others" slot, plus a background-vs-foreground group G0; at test time each group's class
    probabilities are scaled by G0's foreground probability.

    ``cls_score`` has C + N + 2 outputs laid out as ``[bg, fg | others_1, G1 classes | ... ]``
    (the authors' layout, so their checkpoints convert column for column). Box regression is
    upstream's, indexed by the original class.

    Buffer ``bags_partition`` (C,): the group bin of every class. It is saved with the model and
    checked on load, because a checkpoint's classifier columns mean other classes under another
    partition.

    The "others" sampling draws from a generator seeded by (SEED, rank, iteration): each rank
    samples its own RoIs, runs are reproducible, and ``--resume`` continues the same stream.
    """

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        instance_counts: Sequence[int],
        bin_edges: Sequence[float] = DEFAULT_BIN_EDGES,
        others_sample_ratio: float = 8.0,
        seed: int = 0,
        **kwargs,
    ):
        """
        Args:
            instance_counts: C training instance counts, contiguous class order.
            bin_edges: group boundaries on the instance count (increasing).
            others_sample_ratio: beta, "others" RoIs drawn per in-group positive.
            seed: base seed of the "others" sampling.
            kwargs: :class:`LongTailOutputLayers` arguments.
        """
        partition = bags_partition(torch.as_tensor(instance_counts, dtype=torch.float64), tuple(bin_edges))
        layout = bags_layout(partition)
        super().__init__(input_shape, num_logits=layout.num_logits, **kwargs)
        if len(instance_counts) != self.num_classes:
            raise ValueError(f"BAGS: {len(instance_counts)} class counts for {self.num_classes} classes")
        if others_sample_ratio <= 0:
            raise ValueError(f"MODEL.LONGTAIL.BAGS.OTHERS_SAMPLE_RATIO must be > 0, got {others_sample_ratio}")
        self.register_buffer("bags_partition", partition)
        self.layout = layout
        self.others_sample_ratio = float(others_sample_ratio)
        self.seed = int(seed)
        self._generator = torch.Generator()
        self._device_layouts = {}
        edges = (0, *bin_edges, float("inf"))
        logger.info(
            "BAGS groups (training instances per class): %s; %d logits",
            ", ".join(
                f"[{edges[b - 1]:g}, {edges[b]:g}): {size} classes"
                for b, size in zip(layout.group_bins, layout.group_sizes)
            ),
            layout.num_logits,
        )

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        bags = cfg.MODEL.LONGTAIL.BAGS
        ret["instance_counts"] = load_class_stats(cfg).instance_count
        ret["bin_edges"] = tuple(bags.BIN_EDGES)
        ret["others_sample_ratio"] = bags.OTHERS_SAMPLE_RATIO
        # detectron2 seeds its own RNGs from SEED; SEED < 0 means a random seed for this run.
        ret["seed"] = cfg.SEED if cfg.SEED >= 0 else int(torch.randint(2**31 - 1, ()))
        return ret

    def _layout_on(self, device):
        if device not in self._device_layouts:
            self._device_layouts[device] = self.layout.to(device)
        return self._device_layouts[device]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "bags_partition"
        if key in state_dict and not torch.equal(state_dict[key].to(self.bags_partition), self.bags_partition):
            moved = int((state_dict[key].to(self.bags_partition) != self.bags_partition).sum())
            raise ValueError(
                f"The checkpoint's BAGS groups differ from those of the class statistics ({moved} "
                "classes in another group), so its classifier columns would mean other classes. "
                "Evaluate with the statistics it was trained with: set MODEL.LONGTAIL.CLASS_STATS_PATH "
                "to the training run's class_stats.json, and the same MODEL.LONGTAIL.BAGS.BIN_EDGES."
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def classification_loss(self, scores, gt_classes):
        storage = get_event_storage()
        # Python hashes tuples of ints deterministically, so the stream depends on nothing else.
        self._generator.manual_seed(hash((self.seed, comm.get_rank(), storage.iter)) % (2**63))
        group_losses = bags_loss(
            scores, gt_classes, self._layout_on(scores.device), self.others_sample_ratio, self._generator
        )
        storage.put_scalars(
            **{f"bags/loss_group{n}": float(v) for n, v in enumerate(group_losses.detach())},
            smoothing_hint=True,
        )
        return group_losses.sum()

    def class_probs(self, scores):
        return bags_probs(scores, self._layout_on(scores.device))
