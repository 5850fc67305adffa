from .base import LongTailOutputLayers
from .bags import BAGSOutputLayers  # registers BAGSOutputLayers
from .build import LONGTAIL_PREDICTOR_REGISTRY, build_longtail_predictor
from .ecm import ECMOutputLayers  # registers ECMOutputLayers
from .eqlv2 import EQLv2OutputLayers  # registers EQLv2OutputLayers
from .iif import IIFOutputLayers  # registers IIFOutputLayers
from .lda import LDAOutputLayers  # registers LDAOutputLayers
from .seesaw import SeesawOutputLayers  # registers SeesawOutputLayers
from .softmax_ce import SoftmaxCEOutputLayers  # registers SoftmaxCEOutputLayers

__all__ = [
    "BAGSOutputLayers",
    "ECMOutputLayers",
    "EQLv2OutputLayers",
    "IIFOutputLayers",
    "LDAOutputLayers",
    "LONGTAIL_PREDICTOR_REGISTRY",
    "LongTailOutputLayers",
    "SeesawOutputLayers",
    "SoftmaxCEOutputLayers",
    "build_longtail_predictor",
]
