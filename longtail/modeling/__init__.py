# Importing the modules registers LongTailROIHeads (ROI_HEADS_REGISTRY) and the predictors
# (LONGTAIL_PREDICTOR_REGISTRY).
from .predictors import LONGTAIL_PREDICTOR_REGISTRY, build_longtail_predictor
from .roi_heads import LongTailROIHeads

__all__ = ["LONGTAIL_PREDICTOR_REGISTRY", "LongTailROIHeads", "build_longtail_predictor"]
