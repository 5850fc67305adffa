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

    #: Whether these heads run PCB's regulariser (MODEL.LONGTAIL.PCB.ENABLED).
    supports_pcb = False

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        if cfg.MODEL.LONGTAIL.PCB.ENABLED and not cls.supports_pcb:
            raise ValueError(
                "MODEL.LONGTAIL.PCB.ENABLED needs PCB's iterative box head: set "
                f"MODEL.ROI_HEADS.NAME: PCBROIHeads (it is {cls.__name__})."
            )
        ret = super()._init_box_head(cfg, input_shape)
        # Upstream builds its FastRCNNOutputLayers here too; replacing it keeps this override to
        # one line instead of a copy of the parent's pooler/head construction.
        ret["box_predictor"] = build_longtail_predictor(cfg, ret["box_head"].output_shape)
        return ret
