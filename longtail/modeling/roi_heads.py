"""ROI heads that take their box predictor from LONGTAIL_PREDICTOR_REGISTRY."""
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads

from .predictors import build_longtail_predictor

__all__ = ["LongTailROIHeads"]


@ROI_HEADS_REGISTRY.register()
class LongTailROIHeads(StandardROIHeads):
    """:class:`StandardROIHeads` whose box predictor is ``MODEL.LONGTAIL.PREDICTOR``.

    Everything else (pooler, box head, mask head, sampling, inference) is upstream's, so the
    default predictor gives exactly the stock model.
    """

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        # Upstream builds its FastRCNNOutputLayers here too; replacing it keeps this override to
        # one line instead of a copy of the parent's pooler/head construction.
        ret["box_predictor"] = build_longtail_predictor(cfg, ret["box_head"].output_shape)
        return ret
