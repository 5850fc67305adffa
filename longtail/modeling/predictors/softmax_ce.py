"""Softmax cross-entropy as a long-tail predictor (the base of PCB's CE and CE + RFS variants)."""
from typing import Optional

import torch
import torch.nn.functional as F
from detectron2.layers import cross_entropy

from ...functional.pcb import soft_cross_entropy
from .base import LongTailOutputLayers
from .build import LONGTAIL_PREDICTOR_REGISTRY

__all__ = ["SoftmaxCEOutputLayers"]


@LONGTAIL_PREDICTOR_REGISTRY.register()
class SoftmaxCEOutputLayers(LongTailOutputLayers):
    """Softmax CE over K+1 logits, like detectron2's stock predictor (same loss, same scores), but
    with what the long-tail heads need: soft labels (PCB), the cosine classifier switch and
    :meth:`foreground_class_probs`. Plain CE runs should keep the stock predictor (the default).
    """

    #: PCB (specs/pcb.md §2.1): whether :meth:`foreground_class_probs` rows are distributions,
    #: so that the confusion matrix is row- and column-normalised (softmax bases), or not
    #: (sigmoid bases: the raw matrix).
    foreground_probs_sum_to_one = True

    def classification_loss(self, scores, gt_classes, soft_targets: Optional[torch.Tensor] = None):
        """Mean CE over the R RoIs; with ``soft_targets`` (R, K+1) the CE against those labels."""
        if soft_targets is None:
            return cross_entropy(scores, gt_classes, reduction="mean")
        return soft_cross_entropy(scores, soft_targets)

    def class_probs(self, scores):
        return F.softmax(scores, dim=-1)

    def foreground_class_probs(self, scores):
        """(R, K+1) logits -> (R, K) softmax over the foreground logits alone: what PCB's
        confusion matrix accumulates for CE (specs/pcb.md §2.1)."""
        return F.softmax(scores[:, :-1].float(), dim=-1)
