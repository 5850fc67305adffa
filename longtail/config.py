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
    _add_data_config(_C)
    _add_decoupled_config(_C)
    _add_evaluation_config(_C)
    _add_bags_config(_C)
    _add_ecm_config(_C)
    _add_eqlv2_config(_C)
    _add_iif_config(_C)
    _add_lda_config(_C)
    _add_pcb_config(_C)
    _add_seesaw_config(_C)
    return cfg


def _add_data_config(_C):
    """Checks on the training data (see RELIABILITY.md). A data mistake should cost minutes, not a
    day: the preflight runs before the model is built, and an image that cannot be read during
    training is skipped and counted instead of killing a multi-day run."""
    _C.MODEL.LONGTAIL.DATA = CN()
    # Preflight of DATASETS.TRAIN at the start of training: "cheap" checks the dataset dicts
    # (category ids, duplicate annotation ids, degenerate boxes and polygons, image sizes) and that
    # every image file exists; "full" also decodes every image (slow at LVIS scale, use
    # `python -m longtail.tools.check_dataset` for it); "off" skips it. Errors stop the run.
    _C.MODEL.LONGTAIL.DATA.PREFLIGHT = "cheap"
    # Largest fraction of training images read so far that may be unreadable (skipped, logged as
    # data/skipped_images) before training stops with the list of files. 0 = any unreadable image
    # is an error.
    _C.MODEL.LONGTAIL.DATA.MAX_SKIPPED_FRACTION = 0.01


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


def _add_evaluation_config(_C):
    """Extra LVIS metrics (specs/evaluation.md §3-4). The standard LVIS numbers are always
    reported; these add tasks beside them."""
    _C.MODEL.LONGTAIL.EVAL = CN()
    # AP^fixed (Dave et al. 2021): no per-image cap, the top AP_FIXED_TOPK detections per class
    # over the dataset; reported as bbox_fixed / segm_fixed. Meaningful only when inference keeps
    # enough detections per class (TEST.DETECTIONS_PER_IMAGE -1 or large); otherwise a lower bound.
    _C.MODEL.LONGTAIL.EVAL.AP_FIXED = False
    _C.MODEL.LONGTAIL.EVAL.AP_FIXED_TOPK = 10000
    # BAGS' bins by training instance count (AP1-AP4 over [0,10), [10,100), [100,1000), [1000,inf)).
    _C.MODEL.LONGTAIL.EVAL.INSTANCE_BINS = True


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


def _add_eqlv2_config(_C):
    """EQL v2, Equalization Loss v2 (Tan et al., CVPR 2021); see specs/eqlv2.md."""
    _C.MODEL.LONGTAIL.EQLV2 = CN()
    # Mapping f(g) = 1 / (1 + exp(-GAMMA (g - MU))) of the accumulated positive/negative gradient
    # ratio g of each class; negatives are weighted f(g), positives 1 + ALPHA (1 - f(g)).
    # [C] gamma 12, mu 0.8, alpha 4 (also PCB's values).
    _C.MODEL.LONGTAIL.EQLV2.GAMMA = 12.0
    _C.MODEL.LONGTAIL.EQLV2.MU = 0.8
    _C.MODEL.LONGTAIL.EQLV2.ALPHA = 4.0
    # Every classifier bias starts at -log((1 - pi) / pi) (sigmoid prior pi). [C] 0.001.
    _C.MODEL.LONGTAIL.EQLV2.PRIOR_PROB = 0.001
    # Test score sigmoid(z_c) * (1 - sigmoid(z_bg)) (True, [C]) or the raw sigmoid(z_c) (False).
    _C.MODEL.LONGTAIL.EQLV2.TEST_WITH_OBJ = True


def _add_seesaw_config(_C):
    """Seesaw loss (Wang et al., CVPR 2021); see specs/seesaw.md. Its cosine box classifier is
    MODEL.LONGTAIL.CLASSIFIER "cosine" (COSINE_SCALE 20), its normalised mask head
    MODEL.ROI_MASK_HEAD.NAME "CosineMaskRCNNConvUpsampleHead"."""
    _C.MODEL.LONGTAIL.SEESAW = CN()
    # Mitigation exponent p: class i's penalty on a rarer class j is scaled (N_j / N_i)^p. [P][C] 0.8
    _C.MODEL.LONGTAIL.SEESAW.P = 0.8
    # Compensation exponent q: a misclassification into j is scaled (sigma_j / sigma_i)^q. [P][C] 2.0
    _C.MODEL.LONGTAIL.SEESAW.Q = 2.0
    # Floor of sigma_i in the compensation factor. [C] 0.01
    _C.MODEL.LONGTAIL.SEESAW.EPS = 0.01
    # All-reduce the per-iteration RoI label counts so every rank holds the global cumulative counts
    # (True). False keeps per-rank counts, as the reference mmdetection code.
    _C.MODEL.LONGTAIL.SEESAW.SYNC_COUNTS = True


def _add_lda_config(_C):
    """LDA, Long-tailed Distribution Adaptation (Peng et al., ACM MM 2021); see specs/lda.md.
    Symbols of the paper's eq. 9/10: L = eps_u + lambda_b * alpha * eps_b + beta (L_intra + L_inter)."""
    _C.MODEL.LONGTAIL.LDA = CN()
    # gamma: alpha = max(mean acc(h') - mean acc(h), 0) ** gamma, accuracies in percent over the
    # last WINDOW iterations. [P] 1.5 on LVIS.
    _C.MODEL.LONGTAIL.LDA.GAMMA = 1.5
    # beta: weight of the divergence terms L_intra + L_inter on the projected features. [P] 0.1.
    _C.MODEL.LONGTAIL.LDA.BETA = 0.1
    # Delta m: margin of the inter-class hinge max(0, margin - (1 - cos(mu_i, mu_j))). [P] 1.
    _C.MODEL.LONGTAIL.LDA.MARGIN = 1.0
    # lambda_u and lambda_b: weights of the unbalanced (h') and balanced (h) risks.
    # [C] 1 and 2 (the paper's eq. 9 implies 1 and 1).
    _C.MODEL.LONGTAIL.LDA.UNBALANCED_WEIGHT = 1.0
    _C.MODEL.LONGTAIL.LDA.BALANCED_WEIGHT = 2.0
    # d: output size of the linear projection head p. [C] 128.
    _C.MODEL.LONGTAIL.LDA.PROJECTION_DIM = 128
    # L: iterations in the accuracy window of alpha. [C] 100.
    _C.MODEL.LONGTAIL.LDA.WINDOW = 100
    # > 0: use this alpha instead of the adaptive one (the paper's fixed-alpha ablation).
    _C.MODEL.LONGTAIL.LDA.FIXED_ALPHA = -1.0
    # Reduction of the balanced risk eps_b: "code" (sum of w_y CE with w_c = 1 / (C n_c), the
    # authors' code), "mean" (mean of N_tot / (C n_c) weighted CE: the code form x N_tot / N) or
    # "self_norm" (weighted mean, sum w CE / sum w). The scale differs by orders of magnitude at
    # LVIS scale; see README.md (LDA) for the one the configs use.
    _C.MODEL.LONGTAIL.LDA.BALANCED_NORM = "code"
    # Reduction of the unbalanced risk eps_u over the positive RoIs: "positives" (the mean over
    # the positives, the paper's eps_u) or "sampled" (their summed CE over all R sampled RoIs, as
    # detectron2's CE). [D] "positives" is the paper; "sampled" keeps each positive RoI's gradient
    # into the shared box head at plain CE's size instead of R / N_pos times it (4x on LVIS,
    # 10-15x on shapes-lt, where it collapses the box features; README.md, LDA).
    _C.MODEL.LONGTAIL.LDA.UNBALANCED_NORM = "positives"
    # Weights of the inter-class pairs: "none" (plain mean, the code default), "code" (normalised
    # (w_i + w_j)) or "paper" (unnormalised (w_i + w_j), eq. 8).
    _C.MODEL.LONGTAIL.LDA.INTER_WEIGHTING = "none"
    # Which count is n_c: "instance" (annotations) or "image". [D] instance.
    _C.MODEL.LONGTAIL.LDA.COUNT_TYPE = "instance"


def _add_pcb_config(_C):
    """PCB, Pairwise Class Balance (He et al., CVPR 2022); see specs/pcb.md. ENABLED turns the box
    branch of LongTailROIHeads into PCB's iterative head (NUM_STEPS passes) with the confusion
    matrix regulariser. The base loss is the predictor: SoftmaxCEOutputLayers (CE, and CE + RFS
    with the RFS sampler), EQLv2OutputLayers or SeesawOutputLayers."""
    _C.MODEL.LONGTAIL.PCB = CN()
    # PCB on the configured predictor: the iterative box head and the fightback regulariser.
    _C.MODEL.LONGTAIL.PCB.ENABLED = False
    # alpha: soft-label weight of the last pass; pass r of R gets alpha * r / (R - 1). 0 is the
    # paper's "iterative head only" ablation.
    # [C] CE and RFS 0.4, EQL v2 0.2, Seesaw 0.05.
    _C.MODEL.LONGTAIL.PCB.ALPHA = 0.4
    # EMA momentum of the confusion matrix, updated once per pass (R times per iteration). [C] 0.99
    _C.MODEL.LONGTAIL.PCB.MOMENTUM = 0.99
    # The regulariser starts at this iteration. [C] after epoch 16 of 24: set it to the first LR
    # step (2/3 of MAX_ITER) in a leaf.
    _C.MODEL.LONGTAIL.PCB.START_ITER = 0
    # [C] start only once every class has had a foreground proposal. On a subset where some
    # class never appears this keeps PCB off for the whole run (a warning says so); False starts
    # anyway (unseen classes' columns are zero and give no mass).
    _C.MODEL.LONGTAIL.PCB.REQUIRE_ALL_SEEN = True
    # Passes R of the iterative box head; 1 = the plain head ("PCB only" ablation). [C] 3
    _C.MODEL.LONGTAIL.PCB.NUM_STEPS = 3
    # Classification-loss weight of each pass; the box loss is the last pass's only. [C] 0.2 0.2 0.6
    _C.MODEL.LONGTAIL.PCB.STEP_WEIGHTS = [0.2, 0.2, 0.6]
    # Hidden width of the two MLPs that turn a pass's logits and deltas into feature modulation.
    _C.MODEL.LONGTAIL.PCB.MLP_HIDDEN = 512
    # LayerNorm on the logits before the logit MLP. [C] True for EQL v2 only.
    _C.MODEL.LONGTAIL.PCB.MLP_LAYER_NORM = False
    # Log PCB diagnostics (classes seen, active, pairwise bias, mean diagonal per r/c/f) every
    # this many iterations; the confusion-matrix heatmap is written at every checkpoint.
    _C.MODEL.LONGTAIL.PCB.LOG_PERIOD = 20
