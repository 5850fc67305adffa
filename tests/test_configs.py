"""Every YAML under configs/ loads through add_longtail_config and names registered things; the LVIS
base carries the papers' recipe; config mistakes fail loudly."""

import glob
import os

import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY

from longtail import LONGTAIL_PREDICTOR_REGISTRY, add_longtail_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
LVIS_BASE = os.path.join(REPO, "configs", "Base-LVISv1-RCNN-FPN.yaml")
LVIS_V05_BASE = os.path.join(REPO, "configs", "Base-LVISv0.5-RCNN-FPN.yaml")
SHAPES_LT_BASE = os.path.join(REPO, "configs", "Base-ShapesLT-RCNN-FPN.yaml")
# Eval configs of the papers' released checkpoints (R101 included; some need the LVIS train json
# for their statistics): they load like every config, but the recipe and build tests below are
# for the training configs. tests/test_convert_mmdet.py checks them against the converter.
RELEASED = os.path.join(REPO, "configs", "released") + os.sep
TRAINING_CONFIGS = [p for p in CONFIGS if not p.startswith(RELEASED)]


def _load(path):
    cfg = get_cfg()
    add_longtail_config(cfg)
    cfg.merge_from_file(path)
    return cfg


def _id(path):
    return os.path.relpath(path, os.path.join(REPO, "configs"))


def test_configs_are_found():
    names = {_id(p) for p in CONFIGS}
    assert {
        "Base-LVISv1-RCNN-FPN.yaml",
        "Base-ShapesLT-RCNN-FPN.yaml",
        os.path.join("quick_schedules", "ce_instant_test.yaml"),
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=_id)
def test_config_loads_and_names_registered_things(path):
    cfg = _load(path)
    assert cfg.MODEL.ROI_HEADS.NAME in ROI_HEADS_REGISTRY
    assert cfg.MODEL.LONGTAIL.PREDICTOR in LONGTAIL_PREDICTOR_REGISTRY
    registered = set(DatasetCatalog.list())
    for name in tuple(cfg.DATASETS.TRAIN) + tuple(cfg.DATASETS.TEST):
        assert name in registered, f"{_id(path)}: dataset {name!r} is not registered"
    assert cfg.DATASETS.TRAIN, "a config without training data"


@pytest.mark.parametrize(
    "path",
    [p for p in TRAINING_CONFIGS if os.sep + "LVISv1" + os.sep in p or p == LVIS_BASE],
    ids=_id,
)
def test_lvis_v1_configs_follow_the_paper_recipe(path):
    cfg = _load(path)
    assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" and cfg.MODEL.MASK_ON
    assert cfg.MODEL.RESNETS.DEPTH == 50
    assert cfg.MODEL.BACKBONE.NAME == "build_resnet_fpn_backbone"
    leaf = os.path.basename(path)
    if leaf.startswith("bags_stage2_"):
        # BAGS stage 2 starts from stage 1 and keeps the authors' score threshold (test_bags_...).
        assert cfg.MODEL.WEIGHTS.endswith("bags_stage1_mask_rcnn_R_50_FPN_1x/model_final.pth")
        assert cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST == pytest.approx(1e-3)
    else:
        assert cfg.MODEL.WEIGHTS.endswith("ImageNetPretrained/MSRA/R-50.pkl")
        assert cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST == pytest.approx(1e-4)
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 1203
    assert cfg.MODEL.ROI_HEADS.NAME == "LongTailROIHeads"
    assert cfg.TEST.DETECTIONS_PER_IMAGE == 300
    # 1x = 90k iterations at batch 16 (detectron2's LVIS 1x); 2x doubles it. EQL v2 keeps its
    # authors' 12 epochs without RFS, ~75k iterations (test_eqlv2_lvis_config_...).
    # LDA keeps the paper's batch 8 over 12 / 24 epochs (test_lda_lvis_configs_...).
    if leaf.startswith("eqlv2_"):
        assert cfg.SOLVER.MAX_ITER == 75000
    elif leaf.startswith("lda_"):
        assert cfg.SOLVER.MAX_ITER == (300000 if "_2x" in leaf else 150000)
    else:
        assert cfg.SOLVER.MAX_ITER == (180000 if "_2x" in leaf else 90000)
    assert cfg.SOLVER.IMS_PER_BATCH == (8 if leaf.startswith("lda_") else 16)
    assert tuple(cfg.DATASETS.TRAIN) == ("lvis_v1_train",)
    assert tuple(cfg.DATASETS.TEST) == ("lvis_v1_val",)
    if leaf.startswith(("ce_rfs_", "fed_", "ecm_", "iif_", "seesaw_", "lda_", "pcb_ce_rfs_", "pcb_seesaw_")):
        assert cfg.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler"
        assert cfg.DATALOADER.REPEAT_THRESHOLD == pytest.approx(0.001)
    else:
        assert cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler"
    if leaf.startswith("fed_"):
        assert cfg.MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE and cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS
        assert cfg.MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES == 50
    else:
        assert not cfg.MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE and not cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS


@pytest.mark.parametrize("schedule", ["1x", "2x"])
def test_ecm_lvis_configs_follow_the_authors_recipe(schedule):
    # specs/ecm.md §5: cosine box and mask classifiers (tau 20), instance counts, r = 6.3313,
    # 10k-iteration warm-up from 1e-4, global gradient-norm clip 5, LR steps at 8/12 and 11/12
    # (1x) or 20/24 and 22/24 (2x) of the schedule.
    cfg = _load(os.path.join(REPO, "configs", "LVISv1", f"ecm_mask_rcnn_R_50_FPN_{schedule}.yaml"))
    ecm = cfg.MODEL.LONGTAIL.ECM
    assert cfg.MODEL.LONGTAIL.PREDICTOR == "ECMOutputLayers"
    assert cfg.MODEL.LONGTAIL.CLASSIFIER == "cosine" and cfg.MODEL.LONGTAIL.COSINE_SCALE == 20.0
    assert cfg.MODEL.LONGTAIL.MASK_COSINE_SCALE == 20.0
    assert cfg.MODEL.ROI_MASK_HEAD.NAME == "CosineMaskRCNNConvUpsampleHead"
    assert ecm.COUNT_TYPE == "instance" and ecm.BG_RATIO == pytest.approx(6.3313)
    assert not ecm.MEASURE_BG_RATIO
    assert cfg.SOLVER.WARMUP_ITERS == 10000 and cfg.SOLVER.WARMUP_FACTOR == pytest.approx(1e-4)
    clip = cfg.SOLVER.CLIP_GRADIENTS
    assert clip.ENABLED and clip.CLIP_TYPE == "full_model" and clip.CLIP_VALUE == 5.0
    assert clip.NORM_TYPE == 2.0
    epochs = (8, 11, 12) if schedule == "1x" else (20, 22, 24)
    expected = tuple(round(cfg.SOLVER.MAX_ITER * e / epochs[2]) for e in epochs[:2])
    assert tuple(cfg.SOLVER.STEPS) == expected


def test_iif_lvis_configs_follow_the_authors_recipes():
    # specs/iif.md §3-4: raw IIF on image counts with a softmax head (Table XII); the final recipe
    # without FASA: base-10 IOF, cosine box T = 8, cosine mask T = 20, NMS 0.3, 2x (steps 16, 22).
    raw = _load(os.path.join(REPO, "configs", "LVISv1", "iif_raw_mask_rcnn_R_50_FPN_1x.yaml"))
    assert raw.MODEL.LONGTAIL.PREDICTOR == "IIFOutputLayers"
    assert (raw.MODEL.LONGTAIL.IIF.VARIANT, raw.MODEL.LONGTAIL.IIF.COUNT_TYPE) == ("raw", "image")
    assert raw.MODEL.LONGTAIL.CLASSIFIER == "linear"
    assert raw.SOLVER.WARMUP_ITERS == 500 and tuple(raw.SOLVER.STEPS) == (60000, 82500)
    final = _load(os.path.join(REPO, "configs", "LVISv1", "iif_base10_iof_cos_mask_rcnn_R_50_FPN_2x.yaml"))
    lt = final.MODEL.LONGTAIL
    assert (lt.IIF.VARIANT, lt.IIF.COUNT_TYPE) == ("base10", "instance")
    assert lt.CLASSIFIER == "cosine" and lt.COSINE_SCALE == 8.0 and lt.MASK_COSINE_SCALE == 20.0
    assert final.MODEL.ROI_MASK_HEAD.NAME == "CosineMaskRCNNConvUpsampleHead"
    assert final.MODEL.ROI_HEADS.NMS_THRESH_TEST == pytest.approx(0.3)
    assert tuple(final.SOLVER.STEPS) == (120000, 165000) and final.SOLVER.MAX_ITER == 180000


def test_eqlv2_lvis_config_follows_the_authors_recipe():
    # specs/eqlv2.md §4: gamma 12, mu 0.8, alpha 4, prior 0.001, objectness at test time, linear
    # classifier and stock mask head, no RFS, 512 RoIs/image, warm-up 500 from 0.001, 12 epochs
    # ~ 75k iterations with LR steps after epochs 8 and 11.
    cfg = _load(os.path.join(REPO, "configs", "LVISv1", "eqlv2_mask_rcnn_R_50_FPN_1x.yaml"))
    lt = cfg.MODEL.LONGTAIL
    assert lt.PREDICTOR == "EQLv2OutputLayers" and lt.CLASSIFIER == "linear"
    assert (lt.EQLV2.GAMMA, lt.EQLV2.MU, lt.EQLV2.ALPHA) == (12.0, 0.8, 4.0)
    assert lt.EQLV2.PRIOR_PROB == pytest.approx(0.001) and lt.EQLV2.TEST_WITH_OBJ
    assert cfg.MODEL.ROI_MASK_HEAD.NAME == "MaskRCNNConvUpsampleHead"
    assert cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler"
    assert cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE == 512
    assert cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION == pytest.approx(0.25)
    assert cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST == pytest.approx(0.5)
    assert cfg.SOLVER.WARMUP_ITERS == 500 and cfg.SOLVER.WARMUP_FACTOR == pytest.approx(1e-3)
    assert cfg.SOLVER.MAX_ITER == 75000
    assert tuple(cfg.SOLVER.STEPS) == (round(75000 * 8 / 12), round(75000 * 11 / 12))
    assert not cfg.SOLVER.CLIP_GRADIENTS.ENABLED


def test_seesaw_lvis_config_follows_the_authors_recipe():
    # specs/seesaw.md §4: p 0.8, q 2, eps 0.01, synchronised counts, cosine box classifier tau 20,
    # "Norm Mask" tau 20, RFS t = 0.001, 512 RoIs/image, warm-up 500 from 0.001, 2x on 180k
    # iterations with LR steps after epochs 16 and 22 of 24.
    cfg = _load(os.path.join(REPO, "configs", "LVISv1", "seesaw_mask_rcnn_R_50_FPN_2x.yaml"))
    lt = cfg.MODEL.LONGTAIL
    assert lt.PREDICTOR == "SeesawOutputLayers"
    assert (lt.SEESAW.P, lt.SEESAW.Q, lt.SEESAW.EPS) == (0.8, 2.0, 0.01) and lt.SEESAW.SYNC_COUNTS
    assert lt.CLASSIFIER == "cosine" and lt.COSINE_SCALE == 20.0 and lt.MASK_COSINE_SCALE == 20.0
    assert cfg.MODEL.ROI_MASK_HEAD.NAME == "CosineMaskRCNNConvUpsampleHead"
    assert cfg.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler"
    assert cfg.DATALOADER.REPEAT_THRESHOLD == pytest.approx(0.001)
    assert cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE == 512
    assert cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST == pytest.approx(0.5)
    assert cfg.SOLVER.WARMUP_ITERS == 500 and cfg.SOLVER.WARMUP_FACTOR == pytest.approx(1e-3)
    assert cfg.SOLVER.MAX_ITER == 180000
    assert tuple(cfg.SOLVER.STEPS) == (round(180000 * 16 / 24), round(180000 * 22 / 24))
    assert not cfg.SOLVER.CLIP_GRADIENTS.ENABLED


@pytest.mark.parametrize("version", ["v1", "v0.5"])
def test_bags_lvis_configs_follow_the_authors_recipe(version):
    # specs/bags.md §4: stage 1 = softmax CE, no RFS, warm-up 500 from 1/3, clip 35; stage 2 loads
    # it, re-initialises and trains only the box classifier, groups 10/100/1000, beta 8, no RFS,
    # score threshold 1e-3; both 12 epochs with LR steps after epochs 8 and 11.
    folder = os.path.join(REPO, "configs", f"LVIS{version}")
    stage1 = _load(os.path.join(folder, "bags_stage1_mask_rcnn_R_50_FPN_1x.yaml"))
    stage2 = _load(os.path.join(folder, "bags_stage2_mask_rcnn_R_50_FPN_1x.yaml"))
    assert stage1.MODEL.ROI_HEADS.NUM_CLASSES == (1203 if version == "v1" else 1230)
    assert stage1.DATASETS.TRAIN == (f"lvis_{version}_train",)
    assert stage1.MODEL.LONGTAIL.PREDICTOR == "FastRCNNOutputLayers"
    assert stage2.MODEL.WEIGHTS == os.path.join(stage1.OUTPUT_DIR, "model_final.pth")
    assert stage2.OUTPUT_DIR != stage1.OUTPUT_DIR
    lt = stage2.MODEL.LONGTAIL
    assert lt.PREDICTOR == "BAGSOutputLayers" and lt.CLASSIFIER == "linear"
    assert list(lt.BAGS.BIN_EDGES) == [10, 100, 1000] and lt.BAGS.OTHERS_SAMPLE_RATIO == 8.0
    assert list(lt.DECOUPLED.REINIT) == list(lt.DECOUPLED.TRAIN_ONLY) == ["roi_heads.box_predictor.cls_score"]
    assert stage2.MODEL.ROI_HEADS.SCORE_THRESH_TEST == pytest.approx(1e-3)
    for cfg in (stage1, stage2):
        assert cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler"
        assert cfg.SOLVER.WARMUP_ITERS == 500 and cfg.SOLVER.WARMUP_FACTOR == pytest.approx(1 / 3)
        clip = cfg.SOLVER.CLIP_GRADIENTS
        assert clip.ENABLED and clip.CLIP_TYPE == "full_model" and clip.CLIP_VALUE == 35.0
        steps = tuple(cfg.SOLVER.STEPS)
        assert steps == pytest.approx((cfg.SOLVER.MAX_ITER * 8 / 12, cfg.SOLVER.MAX_ITER * 11 / 12), rel=0.01)
        assert cfg.TEST.DETECTIONS_PER_IMAGE == 300


@pytest.mark.parametrize("schedule", ["1x", "2x"])
def test_lda_lvis_configs_follow_the_paper_recipe(schedule):
    # specs/lda.md §5: batch 8, LR 0.01, RFS, gamma 1.5, beta 0.1, margin 1; the authors' code
    # lambda_b 2, d 128, window 100, code-form balanced risk; 12 (24) epochs of 100,170 images,
    # LR x0.1 after epochs 8 and 11 (16 and 22); warm-up 1000 from 0.001.
    cfg = _load(os.path.join(REPO, "configs", "LVISv1", f"lda_mask_rcnn_R_50_FPN_{schedule}.yaml"))
    lda = cfg.MODEL.LONGTAIL.LDA
    assert cfg.MODEL.LONGTAIL.PREDICTOR == "LDAOutputLayers"
    assert (lda.GAMMA, lda.BETA, lda.MARGIN) == (1.5, 0.1, 1.0)
    assert (lda.UNBALANCED_WEIGHT, lda.BALANCED_WEIGHT) == (1.0, 2.0)
    assert (lda.PROJECTION_DIM, lda.WINDOW, lda.FIXED_ALPHA) == (128, 100, -1.0)
    assert (lda.BALANCED_NORM, lda.INTER_WEIGHTING, lda.COUNT_TYPE) == ("code", "none", "instance")
    assert lda.UNBALANCED_NORM == "positives"  # the paper's eps_u
    assert cfg.SOLVER.IMS_PER_BATCH == 8 and cfg.SOLVER.BASE_LR == pytest.approx(0.01)
    assert cfg.SOLVER.WARMUP_ITERS == 1000 and cfg.SOLVER.WARMUP_FACTOR == pytest.approx(0.001)
    epochs = (8, 11, 12) if schedule == "1x" else (16, 22, 24)
    iters_per_epoch = 100170 / 8
    assert cfg.SOLVER.MAX_ITER == pytest.approx(epochs[2] * iters_per_epoch, rel=0.002)
    assert tuple(cfg.SOLVER.STEPS) == tuple(round(cfg.SOLVER.MAX_ITER * e / epochs[2]) for e in epochs[:2])


@pytest.mark.parametrize("version", ["v1", "v0.5"])
@pytest.mark.parametrize("base", ["ce", "ce_rfs", "eqlv2", "seesaw"])
def test_pcb_lvis_configs_follow_the_authors_recipe(version, base):
    # specs/pcb.md §5: 3-pass iterative head, weights 0.2/0.2/0.6, EMA 0.99, alpha per base, start
    # at the first LR step (epoch 16 of 24), all classes seen; RFS for the RFS and Seesaw rows;
    # Seesaw with cosine box and mask classifiers; EQL v2 with LayerNorm before the logit MLP.
    cfg = _load(os.path.join(REPO, "configs", f"LVIS{version}", f"pcb_{base}_mask_rcnn_R_50_FPN_2x.yaml"))
    pcb = cfg.MODEL.LONGTAIL.PCB
    predictor = {"ce": "SoftmaxCEOutputLayers", "ce_rfs": "SoftmaxCEOutputLayers",
                 "eqlv2": "EQLv2OutputLayers", "seesaw": "SeesawOutputLayers"}[base]
    assert cfg.MODEL.ROI_HEADS.NAME == "LongTailROIHeads" and cfg.MODEL.LONGTAIL.PREDICTOR == predictor
    assert pcb.ENABLED and pcb.NUM_STEPS == 3 and list(pcb.STEP_WEIGHTS) == [0.2, 0.2, 0.6]
    assert pcb.MOMENTUM == 0.99 and pcb.REQUIRE_ALL_SEEN and pcb.MLP_HIDDEN == 512
    assert pcb.ALPHA == {"ce": 0.4, "ce_rfs": 0.4, "eqlv2": 0.2, "seesaw": 0.05}[base]
    assert pcb.MLP_LAYER_NORM == (base == "eqlv2")
    assert pcb.START_ITER == cfg.SOLVER.STEPS[0]
    assert cfg.SOLVER.STEPS[0] == pytest.approx(cfg.SOLVER.MAX_ITER * 16 / 24, rel=0.005)
    assert cfg.SOLVER.STEPS[1] == pytest.approx(cfg.SOLVER.MAX_ITER * 22 / 24, rel=0.005)
    assert cfg.SOLVER.WARMUP_ITERS == 500 and cfg.SOLVER.WARMUP_FACTOR == pytest.approx(0.001)
    rfs = base in ("ce_rfs", "seesaw")
    assert cfg.DATALOADER.SAMPLER_TRAIN == ("RepeatFactorTrainingSampler" if rfs else "TrainingSampler")
    cosine = base == "seesaw"
    assert (cfg.MODEL.LONGTAIL.CLASSIFIER == "cosine") == cosine
    assert (cfg.MODEL.ROI_MASK_HEAD.NAME == "CosineMaskRCNNConvUpsampleHead") == cosine
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == (1203 if version == "v1" else 1230)


def test_lvis_v1_leaves_exist():
    leaves = {os.path.basename(p) for p in CONFIGS if os.sep + "LVISv1" + os.sep in p}
    assert {
        "ce_mask_rcnn_R_50_FPN_1x.yaml",
        "ce_rfs_mask_rcnn_R_50_FPN_1x.yaml",
        "fed_mask_rcnn_R_50_FPN_1x.yaml",
    } <= leaves


@pytest.mark.parametrize(
    "key",
    ["MODEL.LONGTAIL.PREDICTR", "MODEL.ROI_HEADS.NUM_CLASS", "SOLVER.MAX_ITERS"],
)
def test_a_typo_in_a_yaml_names_the_key(tmp_path, key):
    # A leaf that inherits from the real base through an absolute _BASE_ path.
    *parents, leaf = key.split(".")
    lines = [f'_BASE_: "{SHAPES_LT_BASE}"']
    for depth, node in enumerate(parents):
        lines.append("  " * depth + f"{node}:")
    lines.append("  " * len(parents) + f"{leaf}: 1")
    path = tmp_path / "typo.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        _load(str(path))


def test_unknown_predictor_fails_when_the_model_is_built():
    cfg = _load(SHAPES_LT_BASE)
    cfg.MODEL.LONGTAIL.PREDICTOR = "NoSuchOutputLayers"  # a string key: merging cannot catch it
    with pytest.raises(KeyError, match="NoSuchOutputLayers") as err:
        build_model(cfg)
    message = str(err.value)
    assert "MODEL.LONGTAIL.PREDICTOR" in message
    known = sorted(name for name, _ in LONGTAIL_PREDICTOR_REGISTRY)
    assert "FastRCNNOutputLayers" in known
    for name in known:
        assert name in message


@pytest.mark.parametrize(
    "path",
    [p for p in TRAINING_CONFIGS
     if os.sep + "LVISv" not in p and p not in (LVIS_BASE, LVIS_V05_BASE)]
    + [os.path.join(REPO, "configs", "LVISv1", "fed_mask_rcnn_R_50_FPN_1x.yaml")],
    ids=_id,
)
def test_config_builds_its_model(path):
    # Building reads no dataset and no weights; the fed-loss leaves need the class image counts
    # of DATASETS.TRAIN from the metadata (shapes-lt: the seed; LVIS: detectron2's builtin table).
    cfg = _load(path)
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    predictor = model.roi_heads.box_predictor
    assert type(predictor) is LONGTAIL_PREDICTOR_REGISTRY.get(cfg.MODEL.LONGTAIL.PREDICTOR)
    assert predictor.num_classes == cfg.MODEL.ROI_HEADS.NUM_CLASSES
    assert predictor.use_fed_loss == cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS
    if predictor.use_fed_loss:
        assert predictor.fed_loss_cls_weights.shape == (cfg.MODEL.ROI_HEADS.NUM_CLASSES,)
        assert bool((predictor.fed_loss_cls_weights > 0).all())
