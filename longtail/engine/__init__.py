from .trainer import LongTailTrainer, check_output_dir

__all__ = ["LongTailTrainer", "check_output_dir"]
