"""Seesaw loss (Wang et al., CVPR 2021). Math: ``functional/seesaw.py``."""
from typing import Optional

import torch
from detectron2.config import configurable

from ...functional.seesaw import (
    seesaw_class_probs,
    seesaw_count_increments,
    seesaw_loss,
    seesaw_probs,
)
from ..distributed import all_reduce_sum
from .base import LongTailOutputLayers
from .build import LONGTAIL_PREDICTOR_REGISTRY

__all__ = ["SeesawOutputLayers"]


@LONGTAIL_PREDICTOR_REGISTRY.register()
class SeesawOutputLayers(LongTailOutputLayers):
    """A C-way class softmax trained with the seesaw-adjusted cross-entropy (foreground RoIs) and a
    2-way objectness softmax (all RoIs); the class score is class softmax x p(object).

    ``cls_score`` has C+2 outputs in mmdet's layout: C class logits, then [object, background],
    so converted checkpoints map column for column. ``forward`` returns these raw logits;
    ``predict_probs`` turns them into (R, C+1) probabilities, background last, rows summing to 1.
    Box regression stays upstream's (4C deltas, class-specific).

    Buffer ``seesaw_cum_samples`` (C+1,) float64: the cumulative number of sampled RoIs per label
    (background last; float64 counts exactly up to 2^53). Each training loss call adds its own
    histogram *before* the loss, summed over ranks when ``sync_counts`` (then identical on every
    rank), per rank otherwise (the reference). Evaluation never changes it.

    The loss is two terms, ``loss_cls_classes`` and ``loss_cls_objectness``, logged separately.
    """

    #: PCB (specs/pcb.md §2.1): whether :meth:`foreground_class_probs` rows are distributions,
    #: so that the confusion matrix is row- and column-normalised (softmax bases), or not
    #: (sigmoid bases: the raw matrix).
    foreground_probs_sum_to_one = True

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        p: float = 0.8,
        q: float = 2.0,
        eps: float = 0.01,
        sync_counts: bool = True,
        **kwargs,
    ):
        """
        Args:
            p: mitigation exponent.
            q: compensation exponent.
            eps: floor of the target probability in the compensation factor.
            sync_counts: all-reduce each call's label histogram across ranks.
            kwargs: :class:`LongTailOutputLayers` arguments (``num_logits`` is fixed to C+2).
        """
        num_classes = kwargs["num_classes"]
        super().__init__(input_shape, num_logits=num_classes + 2, **kwargs)
        for name, value in (("P", p), ("Q", q), ("EPS", eps)):
            if not value >= 0:
                raise ValueError(f"MODEL.LONGTAIL.SEESAW.{name} must be >= 0, got {value}")
        self.p, self.q, self.eps = float(p), float(q), float(eps)
        self.sync_counts = bool(sync_counts)
        self.register_buffer(
            "seesaw_cum_samples", torch.zeros(self.num_classes + 1, dtype=torch.float64)
        )

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        seesaw = cfg.MODEL.LONGTAIL.SEESAW
        # fmt: off
        ret["p"]           = seesaw.P
        ret["q"]           = seesaw.Q
        ret["eps"]         = seesaw.EPS
        ret["sync_counts"] = seesaw.SYNC_COUNTS
        # fmt: on
        return ret

    def classification_loss(self, scores, gt_classes, soft_targets: Optional[torch.Tensor] = None):
        """The two Seesaw terms; in training, the counts first take in this call's labels.

        Args:
            scores: (R, C+2) logits.
            gt_classes: (R,) labels in [0, C].
            soft_targets: optional (R, C+1) soft labels, background last (PCB's Seesaw variant):
                their class columns replace the one-hot target of the class term; the seesaw
                factors still come from ``gt_classes``.
        """
        with torch.no_grad():
            increments = seesaw_count_increments(gt_classes, self.num_classes)
            increments = increments.to(self.seesaw_cum_samples)
            if self.training:
                if self.sync_counts:
                    # One collective per call on every rank (zeros when it has no RoI).
                    increments = all_reduce_sum(increments)
                self.seesaw_cum_samples += increments
                counts = self.seesaw_cum_samples
            else:
                # Same loss as in training, but the buffer is left alone.
                counts = self.seesaw_cum_samples + increments
        losses = seesaw_loss(
            scores, gt_classes, counts, self.p, self.q, self.eps,
            class_targets=None if soft_targets is None else soft_targets[:, : self.num_classes],
        )
        return {"loss_cls_classes": losses.classes, "loss_cls_objectness": losses.objectness}

    def class_probs(self, scores):
        return seesaw_probs(scores)

    def foreground_class_probs(self, scores):
        """(R, C+2) logits -> (R, C) ``softmax(z[:, :C])``: the class branch alone, raw logits,
        no objectness (what the compensation reads and PCB's Seesaw variant accumulates,
        specs/pcb.md §2.1)."""
        return seesaw_class_probs(scores)
