from .build import LONGTAIL_PREDICTOR_REGISTRY, build_longtail_predictor

__all__ = ["LONGTAIL_PREDICTOR_REGISTRY", "build_longtail_predictor"]
