# Importing the modules registers LongTailROIHeads (ROI_HEADS_REGISTRY),
# CosineMaskRCNNConvUpsampleHead (ROI_MASK_HEAD_REGISTRY) and the predictors
# (LONGTAIL_PREDICTOR_REGISTRY).
from .classifiers import CosineLinear, CosineMaskRCNNConvUpsampleHead, build_box_classifier
from .predictors import LONGTAIL_PREDICTOR_REGISTRY, build_longtail_predictor
from .roi_heads import LongTailROIHeads
from .pcb_roi_heads import PCBIterativeHead

__all__ = [
    "CosineLinear",
    "CosineMaskRCNNConvUpsampleHead",
    "LONGTAIL_PREDICTOR_REGISTRY",
    "LongTailROIHeads",
    "PCBIterativeHead",
    "build_box_classifier",
    "build_longtail_predictor",
]
