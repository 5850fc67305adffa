"""EQL v2: Equalization Loss v2 (Tan et al., CVPR 2021). Math: ``functional/eqlv2.py``."""
import math
from typing import Optional

import torch
from detectron2.config import configurable
from detectron2.utils.events import get_event_storage
from torch import nn

from ...functional.eqlv2 import eqlv2_grad_increments, eqlv2_loss, eqlv2_probs, eqlv2_weights
from ..distributed import all_reduce_sum
from ..guards import check_finite_statistics, mark_non_finite
from .base import LongTailOutputLayers
from .build import LONGTAIL_PREDICTOR_REGISTRY

__all__ = ["EQLv2OutputLayers"]


@LONGTAIL_PREDICTOR_REGISTRY.register()
class EQLv2OutputLayers(LongTailOutputLayers):
    """C+1 independent sigmoid/BCE logits (background last, a class-agnostic background task)
    whose positive and negative terms are re-weighted per class from the accumulated gradient
    ratio; at test time class scores are multiplied by the objectness ``1 - sigmoid(z_bg)``.

    Buffers (saved in every checkpoint, identical on every rank), float64 because Q grows
    without bound over a long schedule:

    * ``eqlv2_pos_grad`` (C,): P, the accumulated re-weighted positive gradient magnitudes;
    * ``eqlv2_neg_grad`` (C,): Q, the same for negatives.

    Every training loss call uses weights from the statistics *before* the call, then adds the
    call's increments summed over ranks (spec §2.3 timing). All zeros means "no statistics yet",
    i.e. unit weights on the first step (spec §3). Evaluation never changes them. NaN/inf logits
    or increments on any rank raise ``FloatingPointError`` on every rank before P and Q change
    (``modeling/guards.py``).
    """

    #: PCB (specs/pcb.md §2.1): whether :meth:`foreground_class_probs` rows are distributions,
    #: so that the confusion matrix is row- and column-normalised (softmax bases), or not
    #: (sigmoid bases: the raw matrix).
    foreground_probs_sum_to_one = False

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        gamma: float = 12.0,
        mu: float = 0.8,
        alpha: float = 4.0,
        prior_prob: float = 0.001,
        test_with_obj: bool = True,
        **kwargs,
    ):
        """
        Args:
            gamma, mu, alpha: the mapping ``r = sigmoid(gamma (g - mu))``,
                ``q = 1 + alpha (1 - r)`` of the gradient ratio g.
            prior_prob: pi of the initial bias ``-log((1 - pi) / pi)`` of every one of the C+1
                logits, so that each sigmoid starts near pi instead of 0.5.
            test_with_obj: score classes by ``sigmoid(z_c) (1 - sigmoid(z_bg))`` (True) or the
                raw ``sigmoid(z_c)``.
            kwargs: :class:`LongTailOutputLayers` arguments.
        """
        super().__init__(input_shape, **kwargs)
        # Validates gamma/mu/alpha now rather than at the first training step.
        eqlv2_weights(torch.zeros(1), torch.zeros(1), gamma, mu, alpha)
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"MODEL.LONGTAIL.EQLV2.PRIOR_PROB must be in (0, 1), got {prior_prob}")
        self.gamma, self.mu, self.alpha = float(gamma), float(mu), float(alpha)
        self.test_with_obj = bool(test_with_obj)
        # Upstream's zero bias starts every RoI at (C+1) ln 2 (~835 on LVIS v1). The cosine
        # classifier adds its bias after the scaled cosine, so the same value applies to both.
        nn.init.constant_(self.cls_score.bias, -math.log((1.0 - prior_prob) / prior_prob))
        self.register_buffer("eqlv2_pos_grad", torch.zeros(self.num_classes, dtype=torch.float64))
        self.register_buffer("eqlv2_neg_grad", torch.zeros(self.num_classes, dtype=torch.float64))

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        eqlv2 = cfg.MODEL.LONGTAIL.EQLV2
        # fmt: off
        ret["gamma"]         = eqlv2.GAMMA
        ret["mu"]            = eqlv2.MU
        ret["alpha"]         = eqlv2.ALPHA
        ret["prior_prob"]    = eqlv2.PRIOR_PROB
        ret["test_with_obj"] = eqlv2.TEST_WITH_OBJ
        # fmt: on
        return ret

    def current_weights(self):
        """The (C+1,) positive and negative weights the next loss call uses
        (:class:`~longtail.functional.eqlv2.EQLv2Weights`)."""
        return eqlv2_weights(
            self.eqlv2_pos_grad, self.eqlv2_neg_grad, self.gamma, self.mu, self.alpha
        )

    def classification_loss(self, scores, gt_classes, soft_targets: Optional[torch.Tensor] = None):
        """EQL v2 loss; in training, also adds this call's statistics (summed over ranks).

        Args:
            scores: (R, C+1) logits.
            gt_classes: (R,) labels in [0, C].
            soft_targets: optional (R, C+1) soft targets in [0, 1] replacing the one-hot of
                ``gt_classes`` in both the loss and the statistics (PCB's EQL v2 variant).
        """
        weights = self.current_weights()
        target = gt_classes if soft_targets is None else soft_targets
        loss = eqlv2_loss(scores, target, weights.pos, weights.neg)
        if self.training:
            with torch.no_grad():
                increments = eqlv2_grad_increments(scores, target, weights.pos, weights.neg)
                # NaN/inf logits (a saturated sigmoid maps inf to a finite increment) or
                # increments on any rank stop the run on every rank before P and Q change.
                local = mark_non_finite(torch.stack(increments).to(self.eqlv2_pos_grad), scores)
                # One collective per call on every rank (zeros when it has no RoI), never skipped.
                total = all_reduce_sum(local)
                check_finite_statistics(
                    total, method=type(self).__name__,
                    statistic="gradient statistics (eqlv2_pos_grad, eqlv2_neg_grad) of the "
                    "classification loss",
                )
                self.eqlv2_pos_grad += total[0]
                self.eqlv2_neg_grad += total[1]
            # Classes no positive has reached yet get q ~ 5 and r ~ 7e-5 (spec §7: log them).
            get_event_storage().put_scalar(
                "eqlv2/classes_without_positives", int((self.eqlv2_pos_grad == 0).sum())
            )
        return loss

    def class_probs(self, scores):
        return eqlv2_probs(scores, self.test_with_obj)

    def foreground_class_probs(self, scores):
        """(R, C+1) logits -> (R, C) element-wise ``sigmoid(z_c)``: the raw class scores, without
        objectness (what PCB's EQL v2 variant accumulates, specs/pcb.md §2.1)."""
        return eqlv2_probs(scores, test_with_obj=False)[:, :-1]
