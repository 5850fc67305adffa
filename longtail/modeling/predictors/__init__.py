from .base import LongTailOutputLayers
from .build import LONGTAIL_PREDICTOR_REGISTRY, build_longtail_predictor
from .ecm import ECMOutputLayers  # registers ECMOutputLayers

__all__ = [
    "ECMOutputLayers",
    "LONGTAIL_PREDICTOR_REGISTRY",
    "LongTailOutputLayers",
    "build_longtail_predictor",
]
