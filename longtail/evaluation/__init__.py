"""LVIS-style evaluation (lvis-api parity on faster-coco-eval) and its detectron2 evaluator."""

from .evaluator import LongTailLVISEvaluator
from .lvis_style import LVISResult, evaluate_lvis_fixed, evaluate_lvis_results, instance_count_bin

__all__ = [
    "LongTailLVISEvaluator",
    "LVISResult",
    "evaluate_lvis_fixed",
    "evaluate_lvis_results",
    "instance_count_bin",
]
