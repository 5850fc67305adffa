"""PCB (He et al., CVPR 2022): the iterative box head and the confusion-matrix regulariser, which
LongTailROIHeads runs when MODEL.LONGTAIL.PCB.ENABLED. Math: ``functional/pcb.py``; design:
specs/pcb.md §2-§4."""
import inspect
import logging
from typing import Sequence

import torch
from detectron2.layers import cat
from detectron2.utils.events import get_event_storage
from torch import nn

from ..functional.pcb import (
    pcb_active,
    pcb_batch_statistics,
    pcb_ema_update,
    pcb_fightback_targets,
    pcb_mixed_targets,
    pcb_step_alphas,
)
from .distributed import all_reduce_sum
from .guards import check_finite_statistics, mark_non_finite
from .predictors import LongTailOutputLayers

logger = logging.getLogger(__name__)

__all__ = ["ConfusionMatrixEMA", "PCBIterativeHead"]


class ConfusionMatrixEMA(nn.Module):
    """The foreground confusion matrix M (C, C): M[i, j] is the EMA of the mean probability of
    class j on foreground proposals of class i, and ``pcb_seen`` (C,) the number of such
    proposals so far. Both are buffers: saved in checkpoints, restored by ``--resume``.

    Every update sums the batch statistics over all ranks with one collective that every rank
    calls on every update, whatever its batch holds, so M is the same on every rank and no rank
    waits on another that skipped it.
    """

    def __init__(self, num_classes: int, momentum: float, normalized: bool):
        super().__init__()
        self.momentum = float(momentum)
        # Softmax bases: rows and columns are normalised; sigmoid bases (EQL v2): raw (§2.1-2.2).
        self.normalized = bool(normalized)
        self.register_buffer("pcb_cm", torch.zeros(num_classes, num_classes))
        self.register_buffer("pcb_seen", torch.zeros(num_classes, dtype=torch.float64))

    @torch.no_grad()
    def update(self, class_probs: torch.Tensor, labels: torch.Tensor, logits=None) -> None:
        """Add one pass: ``class_probs`` (N, C) of the N foreground proposals (any rank may have
        N = 0), ``labels`` (N,); ``logits``, optional, the logits the probabilities came from.

        NaN/inf in ``class_probs`` or ``logits`` on any rank (a saturated sigmoid turns an inf
        logit into a finite 1) raises ``FloatingPointError`` on every rank, after the collective
        and before M or ``pcb_seen`` change.
        """
        probs = class_probs.float()
        # Non-finite entries become zeros so that every rank reaches the collective; the NaN mark
        # below still stops the update.
        finite_probs = torch.nan_to_num(probs, nan=0.0, posinf=0.0, neginf=0.0)
        local = pcb_batch_statistics(finite_probs, labels)
        inputs = (probs,) if logits is None else (probs, logits)
        # ``local`` is finite by construction (sums of at most N probabilities in [0, 1], which
        # pcb_batch_statistics checks), so only the inputs need the check, and the counts column
        # alone carries the mark: a 0-d mark (0, or NaN for non-finite inputs) added to it makes
        # the summed counts NaN on every rank exactly when mark_non_finite(local, *inputs) would
        # have made the whole sum NaN. Scanning and rewriting all C^2 entries for it (twice) was
        # a third of PCB's update on CPU at LVIS scale.
        local[:, -1] += mark_non_finite(local.new_zeros(()), *inputs)
        statistics = all_reduce_sum(local)
        check_finite_statistics(
            statistics[:, -1], method="PCB", statistic="confusion statistics (pcb_cm, pcb_seen)"
        )
        pcb_ema_update(self.pcb_cm, self.pcb_seen, statistics.to(self.pcb_cm.device), self.momentum,
                       renormalize_rows=self.normalized)

    def fightback(self, labels: torch.Tensor) -> torch.Tensor:
        """(N, C) fightback targets of foreground labels: column y of M, column-normalised for
        softmax bases."""
        return pcb_fightback_targets(self.pcb_cm, labels, normalize_columns=self.normalized)


def _accepts_soft_targets(predictor) -> bool:
    return "soft_targets" in inspect.signature(predictor.classification_loss).parameters


class PCBIterativeHead(nn.Module):
    """PCB's box branch, owned by :class:`LongTailROIHeads` when ``MODEL.LONGTAIL.PCB.ENABLED``:
    the box head and predictor run ``num_steps`` times with shared weights, each pass modulating
    the pooled RoI features with the previous pass's logits and deltas
    (``X <- X * mlp_box(deltas) + mlp_cls(logits)``), and each pass's classifier trains against
    the fightback soft labels of the confusion matrix.

    Losses: pass r's classification loss weighted by ``step_weights[r]`` (logged with the suffix
    ``_step{r}``), the box regression loss of the last pass only. Inference uses the last pass.
    ``alpha = 0`` is the paper's "iterative head only" ablation, ``num_steps = 1`` its "PCB only".

    The box head and predictor stay the ROI heads' modules; they are passed in, not owned, so the
    state-dict keys of a PCB model are those of the plain model plus ``pcb.*``.
    """

    def __init__(
        self,
        predictor,
        *,
        pooled_channels: int,
        pooler_resolution: int,
        num_steps: int = 3,
        step_weights: Sequence[float] = (0.2, 0.2, 0.6),
        mlp_hidden: int = 512,
        mlp_layer_norm: bool = False,
        alpha: float = 0.4,
        momentum: float = 0.99,
        start_iter: int = 0,
        require_all_seen: bool = True,
    ):
        super().__init__()
        if not (isinstance(predictor, LongTailOutputLayers) and hasattr(predictor, "foreground_class_probs")
                and _accepts_soft_targets(predictor)):
            raise ValueError(
                f"MODEL.LONGTAIL.PCB.ENABLED needs a predictor that trains on soft labels; "
                f"{type(predictor).__name__} does not. Use SoftmaxCEOutputLayers (CE, CE + RFS), "
                "EQLv2OutputLayers or SeesawOutputLayers as MODEL.LONGTAIL.PREDICTOR."
            )
        if num_steps < 1 or len(step_weights) != num_steps:
            raise ValueError(
                f"MODEL.LONGTAIL.PCB.STEP_WEIGHTS needs one weight per pass: {len(step_weights)} "
                f"weights for NUM_STEPS {num_steps}"
            )
        self.num_classes = predictor.num_classes
        self.num_steps = num_steps
        self.step_weights = tuple(float(w) for w in step_weights)
        self.pooled_channels, self.pooler_resolution = pooled_channels, pooler_resolution
        self.num_logits = predictor.cls_score.out_features
        # Default nn.Linear initialisation, as the reference (§2.4); the outputs are used unbounded.
        self.cls_modulation = nn.Sequential(
            *([nn.LayerNorm(self.num_logits)] if mlp_layer_norm else []),
            nn.Linear(self.num_logits, mlp_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(mlp_hidden, pooled_channels),
        )
        self.box_modulation = nn.Sequential(
            nn.Linear(predictor.bbox_pred.out_features, mlp_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(mlp_hidden, pooler_resolution * pooler_resolution),
        )
        self.alphas = pcb_step_alphas(alpha, num_steps)
        self.start_iter = int(start_iter)
        self.require_all_seen = bool(require_all_seen)
        self.confusion = ConfusionMatrixEMA(self.num_classes, momentum, predictor.foreground_probs_sum_to_one)

    @classmethod
    def from_config(cls, cfg, predictor, input_shape):
        """The head for ``cfg.MODEL.LONGTAIL.PCB`` around ``predictor``; ``input_shape`` is the ROI
        heads' feature shapes."""
        pcb = cfg.MODEL.LONGTAIL.PCB
        channels = {input_shape[f].channels for f in cfg.MODEL.ROI_HEADS.IN_FEATURES}
        if len(channels) != 1:
            raise ValueError(f"PCB needs ROI features of one width, got channels {sorted(channels)}")
        if cfg.MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES:
            raise ValueError("PCB does not support MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES")
        return cls(
            predictor,
            pooled_channels=channels.pop(),
            pooler_resolution=cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION,
            num_steps=pcb.NUM_STEPS,
            step_weights=tuple(pcb.STEP_WEIGHTS),
            mlp_hidden=pcb.MLP_HIDDEN,
            mlp_layer_norm=pcb.MLP_LAYER_NORM,
            alpha=pcb.ALPHA,
            momentum=pcb.MOMENTUM,
            start_iter=pcb.START_ITER,
            require_all_seen=pcb.REQUIRE_ALL_SEEN,
        )

    def passes(self, box_head, predictor, box_features):
        """The (scores, deltas) of every pass over the pooled ``box_features``."""
        passes = []
        for step in range(self.num_steps):
            scores, deltas = predictor(box_head(box_features))
            passes.append((scores, deltas))
            if step + 1 < self.num_steps:  # the last refinement would be unused
                res = self.pooler_resolution
                box_features = box_features * self.box_modulation(deltas).view(-1, 1, res, res) + (
                    self.cls_modulation(scores[:, : self.num_logits]).view(-1, self.pooled_channels, 1, 1)
                )
        return passes

    def active(self) -> bool:
        """Whether the regulariser acts in this iteration (start iteration, every class seen)."""
        return pcb_active(get_event_storage().iter, self.start_iter, self.confusion.pcb_seen,
                          self.require_all_seen)

    def losses(self, predictor, passes, proposals):
        """The training losses of all passes (see the class docstring)."""
        device = passes[-1][0].device
        if proposals:
            gt_classes = cat([p.gt_classes for p in proposals], dim=0)
        else:
            gt_classes = torch.empty(0, dtype=torch.long, device=device)
        foreground = gt_classes < self.num_classes
        active = self.active()
        losses = {}
        for step, ((scores, deltas), weight) in enumerate(zip(passes, self.step_weights)):
            # One update per pass, as the reference (3 per iteration); read after the update.
            # Foreground rows first: the probabilities are row-wise, so the same values for a
            # quarter of the work (background RoIs never enter M).
            fg_scores = scores.detach()[foreground]
            fg_probs = predictor.foreground_class_probs(fg_scores)
            self.confusion.update(fg_probs, gt_classes[foreground], logits=fg_scores)
            alpha = self.alphas[step] if active else 0.0
            soft_targets = None
            if alpha > 0:
                fightback = self.confusion.fightback(gt_classes[foreground])
                soft_targets = pcb_mixed_targets(gt_classes, fightback, alpha, self.num_classes)
            if step + 1 < self.num_steps:
                kwargs = {} if soft_targets is None else {"soft_targets": soft_targets}
                step_losses = predictor.classification_loss(scores, gt_classes, **kwargs)
                if not isinstance(step_losses, dict):
                    step_losses = {"loss_cls": step_losses}
            else:
                step_losses = predictor.losses((scores, deltas), proposals, soft_targets=soft_targets)
            for name, value in step_losses.items():
                if name == "loss_box_reg":
                    losses[name] = value  # the last pass's only, weight 1 (§2.4)
                else:
                    losses[f"{name}_step{step}"] = weight * value
        return losses
