"""ROI heads that take their box predictor from LONGTAIL_PREDICTOR_REGISTRY."""
from typing import Optional

from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads

from .pcb_roi_heads import PCBIterativeHead
from .predictors import build_longtail_predictor

__all__ = ["LongTailROIHeads"]


@ROI_HEADS_REGISTRY.register()
class LongTailROIHeads(StandardROIHeads):
    """:class:`StandardROIHeads` whose box predictor is ``MODEL.LONGTAIL.PREDICTOR``.

    Everything else (pooler, box head, mask head, sampling, inference) is upstream's, so the
    default predictor gives exactly the stock model. With ``MODEL.LONGTAIL.PCB.ENABLED`` the box
    branch is PCB's iterative head (``self.pcb``, see ``pcb_roi_heads.py``).
    """

    @configurable
    def __init__(self, *, pcb: Optional[PCBIterativeHead] = None, **kwargs):
        super().__init__(**kwargs)
        self.pcb = pcb

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        if cfg.MODEL.LONGTAIL.PCB.ENABLED:
            ret["pcb"] = PCBIterativeHead.from_config(cfg, ret["box_predictor"], input_shape)
        return ret

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        # Upstream builds its FastRCNNOutputLayers here too; replacing it keeps this override to
        # one line instead of a copy of the parent's pooler/head construction.
        ret["box_predictor"] = build_longtail_predictor(cfg, ret["box_head"].output_shape)
        return ret

    def _forward_box(self, features, proposals):
        if self.pcb is None:
            return super()._forward_box(features, proposals)
        features = [features[f] for f in self.box_in_features]
        box_features = self.box_pooler(features, [p.proposal_boxes for p in proposals])
        passes = self.pcb.passes(self.box_head, self.box_predictor, box_features)
        if self.training:
            return self.pcb.losses(self.box_predictor, passes, proposals)
        return self.box_predictor.inference(passes[-1], proposals)[0]
