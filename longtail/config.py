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
    # Box classification layer of the long-tail predictors: "linear" (detectron2's nn.Linear) or
    # "cosine" (scale * cosine similarity + bias; ECM, Seesaw and IIF recipes).
    _C.MODEL.LONGTAIL.CLASSIFIER = "linear"
    # Temperature tau of the cosine box classifier. [C] ECM: 20; IIF final recipe: 8.
    _C.MODEL.LONGTAIL.COSINE_SCALE = 20.0
    # Temperature of the cosine mask logits of CosineMaskRCNNConvUpsampleHead (picked with
    # MODEL.ROI_MASK_HEAD.NAME). [C] ECM and IIF: 20.
    _C.MODEL.LONGTAIL.MASK_COSINE_SCALE = 20.0
    _add_decoupled_config(_C)
    _add_bags_config(_C)
    _add_ecm_config(_C)
    _add_iif_config(_C)
    return cfg


def _add_decoupled_config(_C):
    """Decoupled (two-stage) training: stage 2 starts from a stage-1 detector in MODEL.WEIGHTS,
    re-initialises some of its weights and trains only some parameters (BAGS' recipe; cRT-style
    classifier retraining in general). Both lists are parameter-name prefixes, e.g.
    "roi_heads.box_predictor.cls_score"; an entry that matches nothing in the model is an error."""
    _C.MODEL.LONGTAIL.DECOUPLED = CN()
    # Weights that are NOT loaded from MODEL.WEIGHTS but keep their fresh initialisation (the log
    # lists every such key). Applies only when training starts from MODEL.WEIGHTS; --resume loads
    # the stage-2 run's own checkpoint in full.
    _C.MODEL.LONGTAIL.DECOUPLED.REINIT = []
    # If non-empty, only these parameters train: every other parameter gets requires_grad=False
    # and every BatchNorm without a trainable parameter becomes a FrozenBatchNorm2d, so frozen
    # parts keep their stage-1 statistics too. Empty: everything trains (the usual run).
    _C.MODEL.LONGTAIL.DECOUPLED.TRAIN_ONLY = []


def _add_bags_config(_C):
    """BAGS, Balanced Group Softmax (Li et al., CVPR 2020); see specs/bags.md."""
    _C.MODEL.LONGTAIL.BAGS = CN()
    # Group boundaries s^l/s^h on the training *instance* count of each class (not image count):
    # class j is in group 1 + #{edges <= count_j}, so the default gives [0,10), [10,100),
    # [100,1000), [1000,inf) plus the background group G0. [P][C] (10, 100, 1000); the ablation's
    # N=2 is (100,), N=8 is (5, 10, 50, 100, 500, 1000, 5000). Empty groups are dropped.
    _C.MODEL.LONGTAIL.BAGS.BIN_EDGES = [10, 100, 1000]
    # beta: each group with in-group positives also trains on floor(beta * #positives) "others"
    # RoIs drawn at random from the rest of the batch (per rank). [P][C] 8.
    _C.MODEL.LONGTAIL.BAGS.OTHERS_SAMPLE_RATIO = 8.0


def _add_ecm_config(_C):
    """ECM, Effective Class-Margins (Cho & Krähenbühl, ECCV 2022); see specs/ecm.md."""
    _C.MODEL.LONGTAIL.ECM = CN()
    # Which per-class count is n_c^+: "instance" (annotations; the authors' code) or "image".
    _C.MODEL.LONGTAIL.ECM.COUNT_TYPE = "instance"
    # r = #bg / #fg sampled RoIs; background pseudo-count n_bg = r * sum_c n_c (App. F eq. 35).
    # [C] 6.3313, hard-coded by the authors for Mask R-CNN R50-FPN with 512 RoIs/image.
    _C.MODEL.LONGTAIL.ECM.BG_RATIO = 6.3313
    # Measure r instead ("the first few iterations", Sec. 4): count fg/bg labels of the sampled RoIs
    # over the first MEASURE_ITERS iterations, summed over all ranks, then freeze r and the margins.
    # Until then BG_RATIO is used. The measured r is saved in checkpoints and OUTPUT_DIR.
    _C.MODEL.LONGTAIL.ECM.MEASURE_BG_RATIO = False
    _C.MODEL.LONGTAIL.ECM.MEASURE_ITERS = 100


def _add_iif_config(_C):
    """IIF, Inverse Image Frequency (Alexandridis et al., IEEE TIP 2023); see specs/iif.md."""
    _C.MODEL.LONGTAIL.IIF = CN()
    # Weight w_c as a function of the class frequency (paper Sec. III, Table XIV): one of
    # raw, smooth, relative, base2, base10, gombit, normit (functional/iif.py IIF_VARIANTS).
    # [P] raw for the ablations; base10 (with COUNT_TYPE instance) for the final LVIS model.
    _C.MODEL.LONGTAIL.IIF.VARIANT = "raw"
    # Which count is the class frequency: "image" (IIF: images containing c, over K = the number
    # of training images, as in the authors' code) or "instance" (IOF, "inverse object
    # frequency": instances of c over K = all training instances).
    _C.MODEL.LONGTAIL.IIF.COUNT_TYPE = "image"
