"""ECM: Effective Class-Margins (Cho & Krähenbühl, ECCV 2022). Math: ``functional/ecm.py``."""
import logging
from typing import Sequence

import torch
from detectron2.config import configurable

from ...data import load_class_stats
from ...functional.ecm import ecm_loss, ecm_margins, ecm_probs
from ..distributed import all_reduce_sum
from .base import LongTailOutputLayers
from .build import LONGTAIL_PREDICTOR_REGISTRY

logger = logging.getLogger(__name__)

__all__ = ["ECMOutputLayers"]


@LONGTAIL_PREDICTOR_REGISTRY.register()
class ECMOutputLayers(LongTailOutputLayers):
    """C+1 sigmoid channels trained with class margins from the positive/negative counts.

    Buffers (saved in every checkpoint, identical on every rank):

    * ``ecm_class_counts`` (K,): n_c^+ per foreground class;
    * ``ecm_bg_ratio`` (): r = #bg / #fg sampled RoIs, the configured value or the measured one;
    * ``ecm_fg_bg_counts`` (2,), ``ecm_measured_iters`` (): the measurement so far, summed over
      ranks; ``ecm_ratio_frozen`` (): whether r is final;
    * ``ecm_delta``, ``ecm_weight`` (K+1,): the logit shift delta_c and loss weight m_c.
    """

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        class_counts: Sequence[int],
        bg_ratio: float = 6.3313,
        measure_iters: int = 0,
        **kwargs,
    ):
        """
        Args:
            class_counts: K positive counts (instance counts in the paper's code).
            bg_ratio: r used until (or instead of) a measurement.
            measure_iters: measure r over this many training iterations first; 0 = never.
            kwargs: :class:`LongTailOutputLayers` arguments.
        """
        super().__init__(input_shape, **kwargs)
        if len(class_counts) != self.num_classes:
            raise ValueError(f"ECM: {len(class_counts)} class counts for {self.num_classes} classes")
        self.measure_iters = measure_iters
        self.register_buffer("ecm_class_counts", torch.tensor(class_counts, dtype=torch.float64))
        self.register_buffer("ecm_bg_ratio", torch.tensor(float(bg_ratio), dtype=torch.float64))
        self.register_buffer("ecm_fg_bg_counts", torch.zeros(2, dtype=torch.float64))
        self.register_buffer("ecm_measured_iters", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("ecm_ratio_frozen", torch.tensor(measure_iters <= 0))
        self.register_buffer("ecm_delta", torch.zeros(self.num_classes + 1))
        self.register_buffer("ecm_weight", torch.zeros(self.num_classes + 1))
        self._set_margins()

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ecm = cfg.MODEL.LONGTAIL.ECM
        ret["class_counts"] = load_class_stats(cfg).counts(ecm.COUNT_TYPE)
        ret["bg_ratio"] = ecm.BG_RATIO
        ret["measure_iters"] = ecm.MEASURE_ITERS if ecm.MEASURE_BG_RATIO else 0
        return ret

    def _set_margins(self):
        margins = ecm_margins(self.ecm_class_counts, float(self.ecm_bg_ratio))
        self.ecm_delta.copy_(margins.delta)
        self.ecm_weight.copy_(margins.weight)

    def _measure(self, gt_classes: torch.Tensor) -> None:
        """Add this iteration's fg/bg RoI labels, summed over ranks; freeze r when done."""
        num_fg = (gt_classes < self.num_classes).sum()
        local = torch.stack([num_fg, gt_classes.numel() - num_fg]).to(self.ecm_fg_bg_counts)
        self.ecm_fg_bg_counts += all_reduce_sum(local)
        self.ecm_measured_iters += 1
        if int(self.ecm_measured_iters) < self.measure_iters:
            return
        num_fg, num_bg = self.ecm_fg_bg_counts.tolist()
        if num_fg > 0:
            self.ecm_bg_ratio.fill_(num_bg / num_fg)
        else:
            logger.warning("ECM: no foreground RoI in %d iterations; keeping r = %.4f",
                           int(self.ecm_measured_iters), float(self.ecm_bg_ratio))
        self.ecm_ratio_frozen.fill_(True)
        self._set_margins()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # The margins are a function of the counts and r: recompute them from what was loaded,
        # so a checkpoint can never carry margins that disagree with its r.
        self._set_margins()

    def classification_loss(self, scores, gt_classes):
        if self.training and not bool(self.ecm_ratio_frozen):
            self._measure(gt_classes)
        return ecm_loss(scores, gt_classes, self.ecm_delta, self.ecm_weight)

    def class_probs(self, scores):
        return ecm_probs(scores)
