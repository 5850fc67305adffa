"""IIF: Inverse Image Frequency (Alexandridis et al., IEEE TIP 2023). Math: ``functional/iif.py``."""
from typing import Optional, Sequence

import torch
from detectron2.config import configurable

from ...data import load_class_stats
from ...functional.iif import IIF_VARIANTS, iif_loss, iif_probs, iif_weights
from .base import LongTailOutputLayers
from .build import LONGTAIL_PREDICTOR_REGISTRY

__all__ = ["IIFOutputLayers"]


@LONGTAIL_PREDICTOR_REGISTRY.register()
class IIFOutputLayers(LongTailOutputLayers):
    """Softmax over logits multiplied by fixed per-class weights, in the loss and at inference.

    Buffer ``iif_weights`` (K+1,): the weight of every class, background (last) 1. It is a
    function of the training statistics only, saved with the model so that ``--eval-only`` uses
    the weights the model was trained with.
    """

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        class_counts: Sequence[int],
        num_images: Optional[int],
        variant: str = "raw",
        **kwargs,
    ):
        """
        Args:
            class_counts: K per-class counts: image counts (IIF) or instance counts (IOF).
            num_images: K of the formulas: the number of training images for image counts (the
                authors' code, not the paper's sum of image frequencies); None for instance
                counts, where K is the total number of instances.
            variant: one of ``IIF_VARIANTS``.
            kwargs: :class:`LongTailOutputLayers` arguments.
        """
        super().__init__(input_shape, **kwargs)
        if len(class_counts) != self.num_classes:
            raise ValueError(f"IIF: {len(class_counts)} class counts for {self.num_classes} classes")
        weights = iif_weights(torch.tensor(class_counts, dtype=torch.float64), num_images, variant)
        self.register_buffer("iif_weights", weights.float())

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        iif = cfg.MODEL.LONGTAIL.IIF
        stats = load_class_stats(cfg)
        if iif.VARIANT not in IIF_VARIANTS:
            raise ValueError(f"MODEL.LONGTAIL.IIF.VARIANT must be one of {list(IIF_VARIANTS)}")
        ret["class_counts"] = stats.counts(iif.COUNT_TYPE)
        ret["num_images"] = stats.num_images if iif.COUNT_TYPE == "image" else None
        ret["variant"] = iif.VARIANT
        return ret

    def classification_loss(self, scores, gt_classes):
        return iif_loss(scores, gt_classes, self.iif_weights)

    def class_probs(self, scores):
        return iif_probs(scores, self.iif_weights)
