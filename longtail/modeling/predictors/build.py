"""The registry that ``MODEL.LONGTAIL.PREDICTOR`` picks a box predictor from."""
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.utils.registry import Registry

from .base import LongTailOutputLayers

__all__ = ["LONGTAIL_PREDICTOR_REGISTRY", "build_longtail_predictor"]

LONGTAIL_PREDICTOR_REGISTRY = Registry("LONGTAIL_PREDICTOR")
LONGTAIL_PREDICTOR_REGISTRY.__doc__ = """
Box predictors of the long-tailed methods, selected by ``MODEL.LONGTAIL.PREDICTOR``.

A registered object is called as ``obj(cfg, input_shape, **overrides)`` and must honour the
:class:`detectron2.modeling.roi_heads.FastRCNNOutputLayers` contract: ``forward(x)`` returns
``(scores, proposal_deltas)`` with scores (R, K+1), background last; ``losses(predictions,
proposals)`` returns a dict of ``loss_*`` scalars; ``inference``, ``predict_probs`` and
``predict_boxes`` behave as upstream. ``input_shape`` is the box head's output ShapeSpec;
``overrides`` are keyword arguments that replace values read from cfg (e.g. a cascade stage's
``box2box_transform``).
"""

# The baselines. Softmax CE is the stock predictor; sigmoid CE + federated loss is the same class
# switched on by detectron2's own keys (MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE / USE_FED_LOSS).
LONGTAIL_PREDICTOR_REGISTRY.register(FastRCNNOutputLayers)


def build_longtail_predictor(cfg, input_shape, **overrides):
    """Build the box predictor named by ``cfg.MODEL.LONGTAIL.PREDICTOR``."""
    name = cfg.MODEL.LONGTAIL.PREDICTOR
    if name not in LONGTAIL_PREDICTOR_REGISTRY:
        known = ", ".join(sorted(k for k, _ in LONGTAIL_PREDICTOR_REGISTRY))
        raise KeyError(f"MODEL.LONGTAIL.PREDICTOR {name!r} is not registered; known: {known}.")
    predictor_cls = LONGTAIL_PREDICTOR_REGISTRY.get(name)
    if cfg.MODEL.LONGTAIL.CLASSIFIER != "linear" and not issubclass(predictor_cls, LongTailOutputLayers):
        raise ValueError(
            f"MODEL.LONGTAIL.CLASSIFIER {cfg.MODEL.LONGTAIL.CLASSIFIER!r} needs a long-tail "
            f"predictor; {name} always uses detectron2's linear layer. Set CLASSIFIER: linear."
        )
    return predictor_cls(cfg, input_shape, **overrides)
