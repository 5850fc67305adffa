"""longtail: long-tailed detection methods as one Detectron2 extension."""
from .config import add_longtail_config
from .data import register_shapes_lt

# Registration side effects: LongTailROIHeads and the predictors enter detectron2's registries.
from .modeling import LONGTAIL_PREDICTOR_REGISTRY, LongTailROIHeads, build_longtail_predictor

# The built-in dataset is registered like detectron2's own builtins; nothing is generated until a
# split is first loaded.
register_shapes_lt()

__all__ = [
    "LONGTAIL_PREDICTOR_REGISTRY",
    "LongTailROIHeads",
    "add_longtail_config",
    "build_longtail_predictor",
    "register_shapes_lt",
]
