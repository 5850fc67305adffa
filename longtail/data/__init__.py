from .class_stats import ClassStats, frequency_group, load_class_stats
from .datasets import load_lvis_style_json, register_lvis_style_instances, register_shapes_lt

__all__ = [
    "ClassStats",
    "frequency_group",
    "load_class_stats",
    "load_lvis_style_json",
    "register_lvis_style_instances",
    "register_shapes_lt",
]
