"""The common base of the long-tail predictors."""
from typing import Optional

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers, _log_classification_stats

from ..classifiers import build_box_classifier

__all__ = ["LongTailOutputLayers"]


class LongTailOutputLayers(FastRCNNOutputLayers):
    """A :class:`FastRCNNOutputLayers` whose classification loss and class probabilities belong
    to a long-tail method; box regression, inference and the predictor contract stay upstream's.

    Subclasses implement :meth:`classification_loss` and :meth:`class_probs` (usually one call
    into ``longtail.functional``). The box classification layer is ``MODEL.LONGTAIL.CLASSIFIER``.
    """

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        classifier: str = "linear",
        cosine_scale: float = 20.0,
        num_logits: Optional[int] = None,
        **kwargs,
    ):
        """
        Args:
            classifier: "linear" (upstream's layer) or "cosine" (see ``modeling/classifiers.py``).
            cosine_scale: the cosine classifier's temperature.
            num_logits: outputs of ``cls_score``; None means one per class plus background
                (K+1). Methods whose logits are not one per class (BAGS) pass their own.
            kwargs: upstream's arguments (see :class:`FastRCNNOutputLayers`).
        """
        super().__init__(input_shape, **kwargs)
        if self.use_sigmoid_ce or self.use_fed_loss:
            # Those keys switch the stock predictor's loss; a method brings its own.
            raise ValueError(
                f"{type(self).__name__} has its own classification loss: turn off "
                "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE and USE_FED_LOSS (they configure the stock "
                "FastRCNNOutputLayers)."
            )
        num_logits = self.cls_score.out_features if num_logits is None else num_logits
        if classifier != "linear" or num_logits != self.cls_score.out_features:
            self.cls_score = build_box_classifier(
                classifier, self.cls_score.in_features, num_logits, cosine_scale
            )

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["classifier"] = cfg.MODEL.LONGTAIL.CLASSIFIER
        ret["cosine_scale"] = cfg.MODEL.LONGTAIL.COSINE_SCALE
        return ret

    def classification_loss(self, scores: torch.Tensor, gt_classes: torch.Tensor):
        """The method's classification loss: a scalar (logged as ``loss_cls``) or, for a loss of
        several terms, a dict of named scalars whose keys start with ``loss_`` (each is logged and
        added to the total).

        Args:
            scores: (R, L) logits of ``cls_score`` (L = K+1 class logits, background last,
                unless the method passed its own ``num_logits``).
            gt_classes: (R,) labels in [0, K], K = background.
        """
        raise NotImplementedError

    def class_probs(self, scores: torch.Tensor) -> torch.Tensor:
        """(R, L) logits -> (R, K+1) class scores used at inference (background last)."""
        raise NotImplementedError

    def losses(self, predictions, proposals, soft_targets=None):
        """The method's classification loss and upstream's box regression loss.

        Upstream's ``losses`` is not reused because it also evaluates softmax CE on the logits
        (a wasted (R, K+1) pass at LVIS scale) and logs accuracies from an argmax over raw logits,
        which is meaningless for methods whose logits are not one per class (BAGS' groups). The
        accuracies here come from :meth:`class_probs`.

        ``soft_targets`` (R, K+1), background last, replace the one-hot labels in the
        classification loss (PCB's fightback labels); only predictors whose
        ``classification_loss`` takes ``soft_targets`` accept them.
        """
        scores, proposal_deltas = predictions
        if proposals:
            gt_classes = cat([p.gt_classes for p in proposals], dim=0)
            proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals], dim=0)
            # Images without annotations have no gt_boxes; their RoIs are all background, so the
            # regression loss ignores whatever stands in for the targets.
            gt_boxes = cat(
                [(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals], dim=0
            )
        else:
            gt_classes = torch.empty(0, dtype=torch.long, device=scores.device)
            proposal_boxes = gt_boxes = torch.empty((0, 4), device=scores.device)
        with torch.no_grad():
            _log_classification_stats(self.class_probs(scores.detach()), gt_classes)
        if soft_targets is None:
            classification = self.classification_loss(scores, gt_classes)
        else:
            classification = self.classification_loss(scores, gt_classes, soft_targets=soft_targets)
        if not isinstance(classification, dict):
            classification = {"loss_cls": classification}
        losses = {
            **classification,
            "loss_box_reg": self.box_reg_loss(proposal_boxes, gt_boxes, proposal_deltas, gt_classes),
        }
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}

    def predict_probs(self, predictions, proposals):
        scores, _ = predictions
        return self.class_probs(scores).split([len(p) for p in proposals], dim=0)
