"""Config keys of longtail. Every new key lives under ``MODEL.LONGTAIL``; upstream nodes are read,
never extended or re-spelled (see DESIGN.md, "The switch")."""
from detectron2.config import CfgNode as CN


def add_longtail_config(cfg):
    """Add the ``MODEL.LONGTAIL`` node to a detectron2 config, in place.

    Upstream keys that the baselines use stay upstream: sigmoid CE + federated loss is
    ``MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE`` / ``USE_FED_LOSS``; repeat-factor sampling is
    ``DATALOADER.SAMPLER_TRAIN: RepeatFactorTrainingSampler``; full-model gradient-norm clipping
    (the papers' mmdetection ``grad_clip``) is ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE: full_model``.
    """
    _C = cfg
    _C.MODEL.LONGTAIL = CN()
    # Name in LONGTAIL_PREDICTOR_REGISTRY of the box predictor that LongTailROIHeads builds.
    # The default is detectron2's own softmax-CE FastRCNNOutputLayers, so the baseline runs the
    # same code path as every method.
    _C.MODEL.LONGTAIL.PREDICTOR = "FastRCNNOutputLayers"
    # Per-class training statistics (instance/image counts, r/c/f) as a json in LVIS `categories`
    # form (plus an optional top-level `num_images`). Empty: computed from DATASETS.TRAIN.
    _C.MODEL.LONGTAIL.CLASS_STATS_PATH = ""
    return cfg
