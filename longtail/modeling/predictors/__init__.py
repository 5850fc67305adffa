from .base import LongTailOutputLayers
from .bags import BAGSOutputLayers  # registers BAGSOutputLayers
from .build import LONGTAIL_PREDICTOR_REGISTRY, build_longtail_predictor
from .ecm import ECMOutputLayers  # registers ECMOutputLayers
from .iif import IIFOutputLayers  # registers IIFOutputLayers

__all__ = [
    "BAGSOutputLayers",
    "ECMOutputLayers",
    "IIFOutputLayers",
    "LONGTAIL_PREDICTOR_REGISTRY",
    "LongTailOutputLayers",
    "build_longtail_predictor",
]
