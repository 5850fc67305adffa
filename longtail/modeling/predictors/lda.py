"""LDA: Long-tailed Distribution Adaptation (Peng et al., ACM MM 2021), detection version of the
paper's Supp. B. Math: ``functional/lda.py``; design decisions: specs/lda.md."""
import logging
from typing import Sequence

import torch
from detectron2.config import configurable
from detectron2.utils.events import get_event_storage
from torch import nn

from ...data import load_class_stats
from ...functional.lda import (
    BALANCED_NORMS,
    INTER_WEIGHTINGS,
    UNBALANCED_NORMS,
    accuracy_gap,
    adaptive_alpha,
    balanced_risk,
    fgbg_loss,
    inter_class_separation,
    intra_class_compactness,
    lda_class_weights,
    lda_probs,
    top1_correct,
    unbalanced_risk,
)
from ..distributed import all_reduce_sum
from ..guards import check_finite_statistics, mark_non_finite
from .base import LongTailOutputLayers
from .build import LONGTAIL_PREDICTOR_REGISTRY

logger = logging.getLogger(__name__)

__all__ = ["LDAOutputLayers"]


@LONGTAIL_PREDICTOR_REGISTRY.register()
class LDAOutputLayers(LongTailOutputLayers):
    """The (C+1)-way classifier split into heads on the box feature z:

    * g: ``fgbg_score``, foreground vs background (2 outputs, foreground first), trained on every
      sampled RoI;
    * h' and h: ``cls_score`` with 2C outputs ``[h' | h]``, the "unbalanced" (plain CE) and the
      "balanced" (inverse-frequency weighted CE scaled by the adaptive alpha) heads, trained on
      the positive RoIs only;
    * p: ``projection``, a linear map to d dimensions for the intra-class compactness and
      inter-class separation terms (training only, positive RoIs only).

    Since h', h and p only ever see positive RoIs in training, the training forward does not
    apply them: it returns ``[g | z]`` and the loss applies them to the positive rows of z
    (a quarter of the RoIs at LVIS scale, so LDA's heads cost less than CE's one (C+1)-way
    layer). The eval forward returns ``[g | h' | h]``. Test score: P(fg) x softmax(h),
    background P(bg) last.

    Buffers (saved in every checkpoint, identical on every rank):

    * ``lda_class_counts`` (C,): the training counts n_c of the inverse-frequency weights;
    * ``lda_acc_unbalanced``, ``lda_acc_balanced`` (L,): the percent top-1 training accuracy of
      h' and h on the positive RoIs of the last L iterations (zeros until written), from
      correct/total counts summed over ranks;
    * ``lda_step`` (): iterations written so far; slot ``step % L`` is next.
    """

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        class_counts: Sequence[int],
        gamma: float = 1.5,
        beta: float = 0.1,
        margin: float = 1.0,
        unbalanced_weight: float = 1.0,
        balanced_weight: float = 2.0,
        projection_dim: int = 128,
        window: int = 100,
        fixed_alpha: float = -1.0,
        balanced_norm: str = "code",
        unbalanced_norm: str = "positives",
        inter_weighting: str = "none",
        **kwargs,
    ):
        """
        Args:
            class_counts: C training counts per class (instance counts by default).
            gamma, beta, margin: the paper's gamma, beta and Delta m.
            unbalanced_weight, balanced_weight: lambda_u and lambda_b.
            projection_dim: d, the output size of the projection head p.
            window: L, iterations in the accuracy window of alpha.
            fixed_alpha: > 0 replaces the adaptive alpha by this constant.
            balanced_norm: one of ``BALANCED_NORMS``.
            unbalanced_norm: one of ``UNBALANCED_NORMS``.
            inter_weighting: one of ``INTER_WEIGHTINGS``.
            kwargs: :class:`LongTailOutputLayers` arguments.
        """
        num_classes = kwargs["num_classes"]
        super().__init__(input_shape, num_logits=2 * num_classes, **kwargs)
        if len(class_counts) != num_classes:
            raise ValueError(f"LDA: {len(class_counts)} class counts for {num_classes} classes")
        if balanced_norm not in BALANCED_NORMS:
            raise ValueError(f"MODEL.LONGTAIL.LDA.BALANCED_NORM must be one of {list(BALANCED_NORMS)}")
        if unbalanced_norm not in UNBALANCED_NORMS:
            raise ValueError(
                f"MODEL.LONGTAIL.LDA.UNBALANCED_NORM must be one of {list(UNBALANCED_NORMS)}, "
                f"got {unbalanced_norm!r}"
            )
        if inter_weighting not in INTER_WEIGHTINGS:
            raise ValueError(f"MODEL.LONGTAIL.LDA.INTER_WEIGHTING must be one of {list(INTER_WEIGHTINGS)}")
        if window < 1:
            raise ValueError(f"MODEL.LONGTAIL.LDA.WINDOW must be >= 1 iteration, got {window}")
        self.gamma, self.beta, self.margin = float(gamma), float(beta), float(margin)
        self.unbalanced_weight, self.balanced_weight = float(unbalanced_weight), float(balanced_weight)
        self.fixed_alpha = float(fixed_alpha)
        self.balanced_norm, self.inter_weighting = balanced_norm, inter_weighting
        self.unbalanced_norm = unbalanced_norm

        feature_dim = self.cls_score.in_features
        # Initialised as upstream initialises its classifier.
        self.fgbg_score = nn.Linear(feature_dim, 2)
        self.projection = nn.Linear(feature_dim, projection_dim)
        for layer in (self.fgbg_score, self.projection):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0.0)
        counts = torch.tensor(class_counts, dtype=torch.float64)
        self.register_buffer("lda_class_counts", counts)
        self.register_buffer("lda_class_weights", lda_class_weights(counts).float(), persistent=False)
        self.register_buffer("lda_acc_unbalanced", torch.zeros(window, dtype=torch.float64))
        self.register_buffer("lda_acc_balanced", torch.zeros(window, dtype=torch.float64))
        self.register_buffer("lda_step", torch.tensor(0, dtype=torch.int64))
        logger.info(
            "LDA: balanced risk %r, unbalanced risk over %r, lambda_u %g, lambda_b %g, gamma %g, "
            "beta %g, window %d, %s alpha",
            balanced_norm, unbalanced_norm, unbalanced_weight, balanced_weight, gamma, beta, window,
            f"fixed {fixed_alpha:g}" if fixed_alpha > 0 else "adaptive",
        )

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        lda = cfg.MODEL.LONGTAIL.LDA
        ret.update(
            class_counts=load_class_stats(cfg).counts(lda.COUNT_TYPE),
            gamma=lda.GAMMA,
            beta=lda.BETA,
            margin=lda.MARGIN,
            unbalanced_weight=lda.UNBALANCED_WEIGHT,
            balanced_weight=lda.BALANCED_WEIGHT,
            projection_dim=lda.PROJECTION_DIM,
            window=lda.WINDOW,
            fixed_alpha=lda.FIXED_ALPHA,
            balanced_norm=lda.BALANCED_NORM,
            unbalanced_norm=lda.UNBALANCED_NORM,
            inter_weighting=lda.INTER_WEIGHTING,
        )
        return ret

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # The weights are a function of the (possibly loaded) counts; not saved separately.
        self.lda_class_weights.copy_(lda_class_weights(self.lda_class_counts).float())

    def forward(self, x):
        """Training: ``([g | z], deltas)``; eval: ``([g | h' | h], deltas)`` (see the class)."""
        z = torch.flatten(x, start_dim=1)
        fgbg = self.fgbg_score(z)
        head = z if self.training else self.cls_score(z)
        return torch.cat([fgbg, head], dim=1), self.bbox_pred(z)

    def _fgbg_and_rest(self, scores):
        """``(g, rest)``. One ``split`` rather than two slices: each slice's backward fills a zero
        gradient of the full (R, 2 + D) width (the pattern fixed in BAGS' loss)."""
        if self.training and scores.shape[1] != 2 + self.cls_score.in_features:
            raise ValueError(
                f"LDA: training-mode scores must be [g | z] with {2 + self.cls_score.in_features} "
                f"columns, got {scores.shape[1]}; compute them with the predictor in training mode"
            )
        return torch.split(scores, [2, scores.shape[1] - 2], dim=1)

    def _class_logits(self, rest):
        """``(h', h)`` logits from the columns after g: z in training, the logits in eval."""
        logits = self.cls_score(rest) if self.training else rest
        return torch.split(logits, self.num_classes, dim=1)

    @torch.no_grad()
    def _update_alpha_window(self, unbalanced, balanced, labels) -> None:
        """Write this iteration's percent accuracies of h' and h, from counts summed over all
        ranks, and log them.

        Every rank calls the collective (a rank without positives adds zeros), so every rank
        writes the same values; the window only moves when some rank had a positive RoI.
        NaN/inf logits on any rank (``argmax`` would count them as a valid guess) raise
        ``FloatingPointError`` on every rank before the window changes.
        """
        local = torch.stack(
            [
                top1_correct(unbalanced, labels).double(),
                top1_correct(balanced, labels).double(),
                labels.new_tensor(labels.numel(), dtype=torch.float64),
            ]
        )
        summed = all_reduce_sum(mark_non_finite(local, unbalanced, balanced))
        check_finite_statistics(
            summed, method=type(self).__name__,
            statistic="training accuracies of h' and h (lda_acc_unbalanced, lda_acc_balanced)",
        )
        correct_u, correct_b, total = summed.tolist()
        if total == 0:
            return
        acc_u, acc_b = 100.0 * correct_u / total, 100.0 * correct_b / total
        slot = int(self.lda_step) % self.lda_acc_unbalanced.numel()
        self.lda_acc_unbalanced[slot] = acc_u
        self.lda_acc_balanced[slot] = acc_b
        self.lda_step += 1
        get_event_storage().put_scalars(
            **{"lda/acc_unbalanced": acc_u, "lda/acc_balanced": acc_b}, smoothing_hint=False
        )

    def alpha(self) -> torch.Tensor:
        """The current alpha: FIXED_ALPHA, or max(gap, 0) ** gamma over the accuracy window."""
        if self.fixed_alpha > 0:
            return torch.tensor(self.fixed_alpha)
        return adaptive_alpha(self.lda_acc_unbalanced, self.lda_acc_balanced, self.gamma).float()

    def classification_loss(self, scores, gt_classes):
        if not self.training:
            raise RuntimeError(
                "LDA's losses need the training-mode forward (the projection head p runs in "
                "training only); call predictor.train() before computing them"
            )
        fgbg, z = self._fgbg_and_rest(scores)
        positive = gt_classes < self.num_classes
        labels = gt_classes[positive]
        z = z[positive]
        unbalanced, balanced = self._class_logits(z)
        features = self.projection(z)
        self._update_alpha_window(unbalanced.detach(), balanced.detach(), labels)
        alpha = self.alpha().to(scores.device)
        eps_u = unbalanced_risk(
            unbalanced, labels,
            num_sampled=gt_classes.numel() if self.unbalanced_norm == "sampled" else None,
        )
        eps_b = balanced_risk(balanced, labels, self.lda_class_counts, self.balanced_norm)
        divergence = intra_class_compactness(features, labels) + inter_class_separation(
            features, labels, self.margin, self.inter_weighting, self.lda_class_weights
        )
        storage = get_event_storage()
        storage.put_scalars(
            **{
                "lda/alpha": float(alpha),
                "lda/acc_gap": float(accuracy_gap(self.lda_acc_unbalanced, self.lda_acc_balanced)),
                "lda/eps_b": float(eps_b),
            },
            smoothing_hint=False,
        )
        return {
            "loss_cls": fgbg_loss(fgbg, positive),
            "loss_lda_unbalanced": self.unbalanced_weight * eps_u,
            "loss_lda_balanced": self.balanced_weight * alpha * eps_b,
            "loss_lda_divergence": self.beta * divergence,
        }

    def class_probs(self, scores):
        fgbg, rest = self._fgbg_and_rest(scores)
        return lda_probs(fgbg, self._class_logits(rest)[1])
