"""The common base of the long-tail predictors."""
import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

from ..classifiers import build_box_classifier

__all__ = ["LongTailOutputLayers"]


class LongTailOutputLayers(FastRCNNOutputLayers):
    """A :class:`FastRCNNOutputLayers` whose classification loss and class probabilities belong
    to a long-tail method; box regression, inference and the predictor contract stay upstream's.

    Subclasses implement :meth:`classification_loss` and :meth:`class_probs` (usually one call
    into ``longtail.functional``). The box classification layer is ``MODEL.LONGTAIL.CLASSIFIER``.
    """

    @configurable
    def __init__(self, input_shape, *, classifier: str = "linear", cosine_scale: float = 20.0, **kwargs):
        """
        Args:
            classifier: "linear" (upstream's layer) or "cosine" (see ``modeling/classifiers.py``).
            cosine_scale: the cosine classifier's temperature.
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
        if classifier != "linear":
            self.cls_score = build_box_classifier(
                classifier, self.cls_score.in_features, self.cls_score.out_features, cosine_scale
            )

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["classifier"] = cfg.MODEL.LONGTAIL.CLASSIFIER
        ret["cosine_scale"] = cfg.MODEL.LONGTAIL.COSINE_SCALE
        return ret

    def classification_loss(self, scores: torch.Tensor, gt_classes: torch.Tensor) -> torch.Tensor:
        """The method's classification loss.

        Args:
            scores: (R, K+1) class logits, background last.
            gt_classes: (R,) labels in [0, K], K = background.
        """
        raise NotImplementedError

    def class_probs(self, scores: torch.Tensor) -> torch.Tensor:
        """(R, K+1) logits -> (R, K+1) class scores used at inference (background last)."""
        raise NotImplementedError

    def losses(self, predictions, proposals):
        # Upstream computes the box regression loss (and logs the classification accuracy); only
        # its classification term is replaced.
        losses = super().losses(predictions, proposals)
        scores, _ = predictions
        if len(proposals):
            gt_classes = cat([p.gt_classes for p in proposals], dim=0)
        else:
            gt_classes = torch.empty(0, dtype=torch.long, device=scores.device)
        loss_cls = self.classification_loss(scores, gt_classes)
        losses["loss_cls"] = loss_cls * self.loss_weight.get("loss_cls", 1.0)
        return losses

    def predict_probs(self, predictions, proposals):
        scores, _ = predictions
        return self.class_probs(scores).split([len(p) for p in proposals], dim=0)
