"""mmdetection -> detectron2 checkpoint conversion (longtail/tools/convert_mmdet.py).

Every test writes an mmdetection-layout checkpoint of a small Mask R-CNN (a bottleneck ResNet-50
with narrow channels, 6 classes) from the key table below, which is written out here
independently of the converter's own rules, converts it, loads OUT.pth strictly into the model
OUT.yaml builds (the path ``train_net.py --eval-only`` takes), and compares the converted heads
with a hand computation from the original mmdetection tensors.
"""

import glob
import json
import os
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import yaml
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from longtail import add_longtail_config
from longtail.engine.checkpoint import LongTailCheckpointer
from longtail.tools import convert_mmdet
from longtail.tools.convert_mmdet import ConversionError, convert_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(REPO, "configs", "Base-ShapesLT-RCNN-FPN.yaml")

DATASET = "convert_mmdet_test_classes"
NAMES = ["ant", "bee", "cat", "dog", "eel", "fox"]
C = len(NAMES)
# Training instance counts (the BAGS spec's toy example): groups [0,10) = {0, 2}, [10,100) =
# {1, 5}, [100,1000) = {3}, [1000,inf) = {4}.
COUNTS = [3, 50, 7, 500, 5000, 99]

# The small architecture: bottleneck ResNet-50 blocks (3, 4, 6, 3) with narrow widths.
STEM, MID, OUT, BLOCKS = 16, (8, 16, 32, 64), (32, 64, 128, 256), (3, 4, 6, 3)
FPN, FC, MASK, HIDDEN = 16, 32, 16, 12
R = 5  # RoIs in the head checks

# mmdetection key -> detectron2 key, written out by hand ("{roi}" is "roi_head." in mmdet 2.x/3.x
# and "" in mmdet 1.x).
EXPECTED_PAIRS = [
    ("backbone.conv1.weight", "backbone.bottom_up.stem.conv1.weight"),
    ("backbone.bn1.running_var", "backbone.bottom_up.stem.conv1.norm.running_var"),
    ("backbone.layer1.0.downsample.0.weight", "backbone.bottom_up.res2.0.shortcut.weight"),
    ("backbone.layer1.0.downsample.1.bias", "backbone.bottom_up.res2.0.shortcut.norm.bias"),
    ("backbone.layer2.3.conv1.weight", "backbone.bottom_up.res3.3.conv1.weight"),
    ("backbone.layer3.5.conv2.weight", "backbone.bottom_up.res4.5.conv2.weight"),
    ("backbone.layer4.2.bn3.running_mean", "backbone.bottom_up.res5.2.conv3.norm.running_mean"),
    ("neck.lateral_convs.0.conv.weight", "backbone.fpn_lateral2.weight"),
    ("neck.lateral_convs.3.conv.bias", "backbone.fpn_lateral5.bias"),
    ("neck.fpn_convs.1.conv.weight", "backbone.fpn_output3.weight"),
    ("rpn_head.rpn_conv.weight", "proposal_generator.rpn_head.conv.weight"),
    ("rpn_head.rpn_cls.bias", "proposal_generator.rpn_head.objectness_logits.bias"),
    ("rpn_head.rpn_reg.weight", "proposal_generator.rpn_head.anchor_deltas.weight"),
    ("{roi}bbox_head.shared_fcs.0.weight", "roi_heads.box_head.fc1.weight"),
    ("{roi}bbox_head.shared_fcs.1.bias", "roi_heads.box_head.fc2.bias"),
]
MASK_PAIRS = [
    ("{roi}mask_head.convs.0.conv.weight", "roi_heads.mask_head.mask_fcn1.weight"),
    ("{roi}mask_head.convs.3.conv.bias", "roi_heads.mask_head.mask_fcn4.bias"),
    ("{roi}mask_head.upsample.weight", "roi_heads.mask_head.deconv.weight"),
]

V2_TEXT = """model = dict(
    backbone=dict(type='ResNet', depth=50, num_stages=4, frozen_stages=1, style='pytorch'),
    roi_head=dict(
        bbox_head=dict(type='Shared2FCBBoxHead', num_classes=6{cls}),
        mask_head=dict(type='FCNMaskHead', num_classes=6{mask})),
    test_cfg=dict(rcnn=dict(score_thr=0.0001, mask_thr_binary=0.5, max_per_img=300)))
img_norm_cfg = dict(
    mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
"""
V3_COSINE_TEXT = """model = dict(
    data_preprocessor=dict(type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_size_divisor=32),
    backbone=dict(type='ResNet', depth=50, style='pytorch'),
    roi_head=dict(
        bbox_head=dict(num_classes=6, cls_predictor_cfg=dict(type='NormedLinear', tempearture=20)),
        mask_head=dict(num_classes=6, predictor_cfg=dict(type='NormedConv2d', tempearture=20))))
"""
V1_TEXT = """model = dict(
    type='MaskRCNN',
    backbone=dict(type='ResNet', depth=50, style='pytorch'),
    bbox_head=dict(type='SharedFCBBoxHead', num_classes=7, target_stds=[0.1, 0.1, 0.2, 0.2]),
    mask_head=dict(type='FCNMaskHead', num_classes=7))
img_norm_cfg = dict(
    mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
"""


@pytest.fixture(scope="module", autouse=True)
def class_names():
    if DATASET not in DatasetCatalog.list():
        DatasetCatalog.register(DATASET, lambda: [])
        MetadataCatalog.get(DATASET).set(thing_classes=list(NAMES))


def _stats_json(tmp_path):
    path = tmp_path / "stats.json"
    cats = [
        dict(id=k + 1, name=n, image_count=max(1, c // 2), instance_count=c)
        for k, (n, c) in enumerate(zip(NAMES, COUNTS))
    ]
    path.write_text(json.dumps({"num_images": 10000, "categories": cats}))
    return str(path)


def _config(tmp_path, name="model", **model):
    """A small-model config over the ShapesLT base; ``model`` adds MODEL.* keys."""
    node = {
        "RESNETS": {
            "DEPTH": 50,
            "NORM": "FrozenBN",
            "STEM_OUT_CHANNELS": STEM,
            "RES2_OUT_CHANNELS": OUT[0],
            "NUM_GROUPS": 1,
            "WIDTH_PER_GROUP": MID[0],
        },
        "FPN": {"OUT_CHANNELS": FPN},
        "ROI_HEADS": {"NUM_CLASSES": C},
        "ROI_BOX_HEAD": {"FC_DIM": FC},
        "ROI_MASK_HEAD": {"CONV_DIM": MASK, "NUM_CONV": 4},
    }
    for key, value in model.items():
        if isinstance(value, dict):
            node.setdefault(key, {}).update(value)
        else:
            node[key] = value
    data = {"_BASE_": BASE, "MODEL": node, "DATASETS": {"TRAIN": [DATASET], "TEST": [DATASET]}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def mmdet_state(layout, cls_rows, reg_rows, mask_channels=None, seed=0):
    """An mmdetection Mask R-CNN state dict (mask head left out when ``mask_channels`` is None)."""
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    def conv(name, cout, cin, k, bias=False):
        sd[f"{name}.weight"] = rand(cout, cin, k, k)
        if bias:
            sd[f"{name}.bias"] = rand(cout)

    def bn(name, c):
        sd[f"{name}.weight"] = rand(c)
        sd[f"{name}.bias"] = rand(c)
        sd[f"{name}.running_mean"] = rand(c)
        sd[f"{name}.running_var"] = torch.rand(c, generator=g) + 0.5
        sd[f"{name}.num_batches_tracked"] = torch.tensor(7)

    def fc(name, cout, cin):
        sd[f"{name}.weight"] = rand(cout, cin)
        sd[f"{name}.bias"] = rand(cout)

    conv("backbone.conv1", STEM, 3, 7)
    bn("backbone.bn1", STEM)
    cin = STEM
    for i, (n, mid, out) in enumerate(zip(BLOCKS, MID, OUT), start=1):
        for j in range(n):
            p = f"backbone.layer{i}.{j}"
            conv(f"{p}.conv1", mid, cin if j == 0 else out, 1)
            bn(f"{p}.bn1", mid)
            conv(f"{p}.conv2", mid, mid, 3)
            bn(f"{p}.bn2", mid)
            conv(f"{p}.conv3", out, mid, 1)
            bn(f"{p}.bn3", out)
            if j == 0:
                conv(f"{p}.downsample.0", out, cin, 1)
                bn(f"{p}.downsample.1", out)
        cin = out
    for level, width in enumerate(OUT):
        conv(f"neck.lateral_convs.{level}.conv", FPN, width, 1, bias=True)
        conv(f"neck.fpn_convs.{level}.conv", FPN, FPN, 3, bias=True)
    conv("rpn_head.rpn_conv", FPN, FPN, 3, bias=True)
    conv("rpn_head.rpn_cls", 3, FPN, 1, bias=True)
    conv("rpn_head.rpn_reg", 12, FPN, 1, bias=True)
    roi = "roi_head." if layout == "mmdet2" else ""
    fc(f"{roi}bbox_head.shared_fcs.0", FC, FPN * 7 * 7)
    fc(f"{roi}bbox_head.shared_fcs.1", FC, FC)
    fc(f"{roi}bbox_head.fc_cls", cls_rows, FC)
    fc(f"{roi}bbox_head.fc_reg", reg_rows, FC)
    if mask_channels is not None:
        for i in range(4):
            conv(f"{roi}mask_head.convs.{i}.conv", MASK, FPN if i == 0 else MASK, 3, bias=True)
        sd[f"{roi}mask_head.upsample.weight"] = rand(MASK, MASK, 2, 2)  # ConvTranspose2d: (in, out)
        sd[f"{roi}mask_head.upsample.bias"] = rand(MASK)
        conv(f"{roi}mask_head.conv_logits", mask_channels, MASK, 1, bias=True)
    return sd


def _save(path, obj):
    torch.save(obj, str(path))
    return str(path)


def _load_converted(result):
    """The model OUT.yaml builds (``result``: a ConversionResult or the yaml path), with OUT.pth
    loaded the way --eval-only loads it."""
    cfg = get_cfg()
    add_longtail_config(cfg)
    cfg.merge_from_file(getattr(result, "yaml_path", result))
    model = build_model(cfg)
    LongTailCheckpointer(model, strict=True).load(cfg.MODEL.WEIGHTS)
    return cfg, model.eval()


def _heads(model, seed=1):
    """(features, scores, deltas, probs) of the box predictor on R random box features."""
    x = torch.randn(R, FC, generator=torch.Generator().manual_seed(seed))
    predictor = model.roi_heads.box_predictor
    with torch.no_grad():
        scores, deltas = predictor(x)
        proposals = Instances((64, 64), proposal_boxes=Boxes(torch.zeros(R, 4)))
        probs = predictor.predict_probs((scores, deltas), [proposals])[0]
    return x, scores, deltas, probs


def _check_renamed(src, model, roi, mask=True):
    state = model.state_dict()
    for mm, d2 in EXPECTED_PAIRS + (MASK_PAIRS if mask else []):
        assert torch.equal(state[d2], src[mm.format(roi=roi)]), (mm, d2)
    # Every renamed tensor is some source tensor, value for value.
    values = {t.numpy().tobytes() for t in src.values()}
    heads = ("roi_heads.box_predictor.", "roi_heads.mask_head.predictor.", "roi_heads.pcb.")
    for key, t in state.items():
        if not key.startswith(heads):
            assert t.numpy().tobytes() in values, key


def _normalise(t, dim):
    # mmdetection's NormedLinear / NormedConv2d: x / (||x|| + 1e-6).
    return t / (t.norm(dim=dim, keepdim=True) + 1e-6)


def _mask_input(seed=2):
    return torch.randn(2, MASK, 4, 4, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ mmdet 2.x / 3.x


def test_mmdet2_softmax_head_and_written_config(tmp_path, caplog):
    src = mmdet_state("mmdet2", C + 1, 4 * C, mask_channels=C)
    text = V2_TEXT.format(cls="", mask="")
    ckpt = _save(
        tmp_path / "in.pth", {"state_dict": src, "meta": {"CLASSES": tuple(NAMES), "config": text}}
    )
    out = str(tmp_path / "out" / "converted.pth")
    caplog.set_level("INFO", logger="longtail.tools.convert_mmdet")
    # Through the command line, as the docs tell users to run it.
    assert convert_mmdet.main([ckpt, out, "--config", _config(tmp_path)]) == 0
    assert (
        "BatchNorm step counter" in caplog.text
        and "backbone.bn1.num_batches_tracked" in caplog.text
    )

    yaml_path = str(tmp_path / "out" / "converted.yaml")
    written = yaml.safe_load(open(yaml_path))
    assert not os.path.isabs(written["_BASE_"])
    cfg, model = _load_converted(yaml_path)
    assert cfg.MODEL.WEIGHTS == os.path.abspath(out)
    assert cfg.INPUT.FORMAT == "RGB" and not cfg.MODEL.RESNETS.STRIDE_IN_1X1
    assert list(cfg.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53]
    assert list(cfg.MODEL.PIXEL_STD) == [58.395, 57.12, 57.375]
    assert cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE == "ROIAlignV2"
    assert cfg.MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO == 0
    assert tuple(cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS) == (10.0, 10.0, 5.0, 5.0)
    assert cfg.MODEL.ANCHOR_GENERATOR.OFFSET == 0.0
    # A plain dict of tensors that weights_only loading accepts.
    saved = torch.load(out, weights_only=True)
    assert saved["matching_heuristics"] is False and isinstance(saved["__author__"], str)

    _check_renamed(src, model, "roi_head.")
    x, scores, deltas, probs = _heads(model)
    z = x @ src["roi_head.bbox_head.fc_cls.weight"].T + src["roi_head.bbox_head.fc_cls.bias"]
    torch.testing.assert_close(probs, F.softmax(z, dim=1))  # background last in both
    reg = x @ src["roi_head.bbox_head.fc_reg.weight"].T + src["roi_head.bbox_head.fc_reg.bias"]
    torch.testing.assert_close(deltas[:, 4 * 3 : 4 * 4], reg[:, 4 * 3 : 4 * 4])
    feat = _mask_input()
    with torch.no_grad():
        logits = model.roi_heads.mask_head.predictor(feat)
    expected = F.conv2d(
        feat,
        src["roi_head.mask_head.conv_logits.weight"],
        src["roi_head.mask_head.conv_logits.bias"],
    )
    torch.testing.assert_close(logits, expected)
    # The whole converted detector runs.
    with torch.no_grad():
        model([{"image": torch.randint(0, 255, (3, 64, 80), dtype=torch.uint8).float()}])


class _Boom:
    """An object whose unpickling would run code (sets EXPLODED)."""

    def __reduce__(self):
        return (_explode, ())


EXPLODED = []


def _explode():
    EXPLODED.append(True)
    return "exploded"


def test_mmdet3_cosine_box_and_mask_heads(tmp_path):
    src = mmdet_state("mmdet2", C + 1, 4 * C, mask_channels=C)
    # ECM's loss buffers: training state only.
    src["roi_head.bbox_head.loss_cls.sample_n"] = torch.rand(C + 1)
    src["roi_head.bbox_head.loss_cls.detection_cls_weight"] = torch.rand(C + 1)
    # mmdetection 3.x: dataset_meta, cfg, and a message hub of library objects.
    ckpt = _save(
        tmp_path / "in.pth",
        {
            "state_dict": src,
            "meta": {"dataset_meta": {"classes": tuple(NAMES)}, "cfg": V3_COSINE_TEXT},
            "message_hub": _Boom(),
        },
    )
    cosine = dict(
        ROI_MASK_HEAD={"NAME": "CosineMaskRCNNConvUpsampleHead"},
        LONGTAIL={
            "PREDICTOR": "ECMOutputLayers",
            "CLASSIFIER": "cosine",
            "COSINE_SCALE": 20.0,
            "MASK_COSINE_SCALE": 20.0,
            "CLASS_STATS_PATH": _stats_json(tmp_path),
        },
    )
    config = _config(tmp_path, **cosine)
    result = convert_checkpoint(ckpt, str(tmp_path / "ecm.pth"), config)
    assert not EXPLODED, "reading the checkpoint ran code named by the file"
    assert {k for k, _ in result.dropped} >= {
        "roi_head.bbox_head.loss_cls.sample_n",
        "roi_head.bbox_head.loss_cls.detection_cls_weight",
    }
    assert {k for k, _ in result.filled} >= {"roi_heads.box_predictor.ecm_delta"}

    _, model = _load_converted(result)
    _check_renamed(src, model, "roi_head.")
    x, _, _, probs = _heads(model)
    w, b = src["roi_head.bbox_head.fc_cls.weight"], src["roi_head.bbox_head.fc_cls.bias"]
    z = 20.0 * _normalise(x, 1) @ _normalise(w, 1).T + b
    p = torch.sigmoid(z)
    expected = torch.cat([p[:, :C] * (1 - p[:, C:]), p[:, C:]], dim=1)  # ECM: objectness
    torch.testing.assert_close(probs, expected)
    feat = _mask_input()
    with torch.no_grad():
        logits = model.roi_heads.mask_head.predictor(feat)
    w, b = src["roi_head.mask_head.conv_logits.weight"], src["roi_head.mask_head.conv_logits.bias"]
    expected = F.conv2d(20.0 * _normalise(feat, 1), _normalise(w, 1), b)
    torch.testing.assert_close(logits, expected)

    # The recorded training config says cosine: a linear config is refused.
    linear = _config(
        tmp_path,
        name="linear",
        LONGTAIL={"PREDICTOR": "ECMOutputLayers", "CLASS_STATS_PATH": _stats_json(tmp_path)},
    )
    with pytest.raises(ConversionError, match="NormedLinear"):
        convert_checkpoint(ckpt, str(tmp_path / "linear_out.pth"), linear)


def test_mmdet2_seesaw_c_plus_2(tmp_path):
    src = mmdet_state("mmdet2", C + 2, 4 * C, mask_channels=C)
    src["roi_head.bbox_head.loss_cls.cum_samples"] = torch.arange(C + 1, dtype=torch.float32)
    text = V2_TEXT.format(
        cls=", cls_predictor_cfg=dict(type='NormedLinear', tempearture=20)", mask=""
    )
    ckpt = _save(
        tmp_path / "in.pth", {"state_dict": src, "meta": {"CLASSES": tuple(NAMES), "config": text}}
    )
    config = _config(
        tmp_path,
        LONGTAIL={"PREDICTOR": "SeesawOutputLayers", "CLASSIFIER": "cosine", "COSINE_SCALE": 20.0},
    )
    result = convert_checkpoint(ckpt, str(tmp_path / "seesaw.pth"), config)
    _, model = _load_converted(result)
    predictor = model.roi_heads.box_predictor
    torch.testing.assert_close(
        predictor.seesaw_cum_samples, torch.arange(C + 1, dtype=torch.float64)
    )
    x, _, deltas, probs = _heads(model)
    w, b = src["roi_head.bbox_head.fc_cls.weight"], src["roi_head.bbox_head.fc_cls.bias"]
    z = 20.0 * _normalise(x, 1) @ _normalise(w, 1).T + b
    # [classes, object, background]: class softmax times p(object); background = p(background).
    objectness = F.softmax(z[:, C:], dim=1)
    expected = torch.cat([F.softmax(z[:, :C], dim=1) * objectness[:, :1], objectness[:, 1:]], 1)
    torch.testing.assert_close(probs, expected)
    reg = x @ src["roi_head.bbox_head.fc_reg.weight"].T + src["roi_head.bbox_head.fc_reg.bias"]
    torch.testing.assert_close(deltas, reg)


def test_mmdet2_eqlv2_sigmoid_with_pcb_iterative_head(tmp_path):
    src = mmdet_state("mmdet2", C + 1, 4 * C, mask_channels=C)
    g = torch.Generator().manual_seed(5)
    # PCB's IterativeRoIHead MLPs (LayerNorm before the logit MLP for EQL v2), and loss state.
    src["roi_head.cls_sub_module.layers.fc1.weight"] = torch.randn(HIDDEN, C + 1, generator=g)
    src["roi_head.cls_sub_module.layers.fc1.bias"] = torch.randn(HIDDEN, generator=g)
    src["roi_head.cls_sub_module.layers.fc2.weight"] = torch.randn(FPN, HIDDEN, generator=g)
    src["roi_head.cls_sub_module.layers.fc2.bias"] = torch.randn(FPN, generator=g)
    src["roi_head.cls_sub_module.layer_norm.weight"] = torch.randn(C + 1, generator=g)
    src["roi_head.cls_sub_module.layer_norm.bias"] = torch.randn(C + 1, generator=g)
    src["roi_head.loc_sub_module.layers.fc1.weight"] = torch.randn(HIDDEN, 4 * C, generator=g)
    src["roi_head.loc_sub_module.layers.fc1.bias"] = torch.randn(HIDDEN, generator=g)
    src["roi_head.loc_sub_module.layers.fc2.weight"] = torch.randn(49, HIDDEN, generator=g)
    src["roi_head.loc_sub_module.layers.fc2.bias"] = torch.randn(49, generator=g)
    src["roi_head.bbox_head.loss_cls.pos_grad"] = torch.rand(C, generator=g)
    src["roi_head.bbox_head.loss_cls.neg_grad"] = torch.rand(C, generator=g)
    src["roi_head.bbox_head.loss_cls.pos_neg"] = torch.rand(C, generator=g)
    src["roi_head.bbox_head.loss_cls.fg_confusion_matrix"] = torch.rand(C, C, generator=g)
    src["roi_head.bbox_head.loss_cls.num_inst_cnt"] = torch.arange(C, dtype=torch.float32)
    src["roi_head.bbox_head.loss_cls._epoch"] = torch.tensor([24.0])
    ckpt = _save(tmp_path / "in.pth", {"state_dict": src, "meta": {"CLASSES": list(NAMES)}})
    config = _config(
        tmp_path,
        LONGTAIL={
            "PREDICTOR": "EQLv2OutputLayers",
            "PCB": {"ENABLED": True, "MLP_HIDDEN": HIDDEN, "MLP_LAYER_NORM": True},
        },
    )
    result = convert_checkpoint(ckpt, str(tmp_path / "pcb.pth"), config)
    assert {k for k, _ in result.dropped} >= {
        "roi_head.bbox_head.loss_cls.pos_neg",
        "roi_head.bbox_head.loss_cls._epoch",
    }
    _, model = _load_converted(result)
    predictor, pcb = model.roi_heads.box_predictor, model.roi_heads.pcb
    torch.testing.assert_close(
        predictor.eqlv2_pos_grad, src["roi_head.bbox_head.loss_cls.pos_grad"].double()
    )
    torch.testing.assert_close(
        pcb.confusion.pcb_cm, src["roi_head.bbox_head.loss_cls.fg_confusion_matrix"]
    )

    # Three passes by hand with the mmdetection tensors; inference uses the last one.
    def lin(name, t):
        return t @ src[f"{name}.weight"].T + src[f"{name}.bias"]

    features = torch.randn(R, FPN, 7, 7, generator=torch.Generator().manual_seed(3))
    x = features
    for step in range(3):
        h = F.relu(
            lin(
                "roi_head.bbox_head.shared_fcs.1",
                F.relu(lin("roi_head.bbox_head.shared_fcs.0", x.flatten(1))),
            )
        )
        z, d = lin("roi_head.bbox_head.fc_cls", h), lin("roi_head.bbox_head.fc_reg", h)
        if step < 2:
            zn = F.layer_norm(
                z,
                (C + 1,),
                src["roi_head.cls_sub_module.layer_norm.weight"],
                src["roi_head.cls_sub_module.layer_norm.bias"],
            )
            channel = lin(
                "roi_head.cls_sub_module.layers.fc2",
                F.relu(lin("roi_head.cls_sub_module.layers.fc1", zn)),
            )
            spatial = lin(
                "roi_head.loc_sub_module.layers.fc2",
                F.relu(lin("roi_head.loc_sub_module.layers.fc1", d)),
            )
            x = x * spatial.view(-1, 1, 7, 7) + channel.view(-1, FPN, 1, 1)
    with torch.no_grad():
        scores, deltas = pcb.passes(model.roi_heads.box_head, predictor, features)[-1]
        proposals = Instances((64, 64), proposal_boxes=Boxes(torch.zeros(R, 4)))
        probs = predictor.predict_probs((scores, deltas), [proposals])[0]
    torch.testing.assert_close(deltas, d, rtol=1e-4, atol=1e-4)
    p = torch.sigmoid(z)
    expected = torch.cat([p[:, :C] * (1 - p[:, C:]), p[:, C:]], dim=1)  # EQL v2 with objectness
    torch.testing.assert_close(probs, expected, rtol=1e-4, atol=1e-5)


def test_mmdet2_sigmoid_head_without_background_column(tmp_path):
    src = mmdet_state("mmdet2", C, 4 * C)  # use_sigmoid=True: C outputs; a Faster R-CNN
    ckpt = _save(tmp_path / "in.pth", {"state_dict": src, "meta": {"CLASSES": tuple(NAMES)}})
    config = _config(tmp_path, MASK_ON=False, ROI_BOX_HEAD={"USE_SIGMOID_CE": True})
    result = convert_checkpoint(ckpt, str(tmp_path / "sigmoid.pth"), config)
    _, model = _load_converted(result)
    _check_renamed(src, model, "roi_head.", mask=False)
    x, _, _, probs = _heads(model)
    z = x @ src["roi_head.bbox_head.fc_cls.weight"].T + src["roi_head.bbox_head.fc_cls.bias"]
    torch.testing.assert_close(probs[:, :C], torch.sigmoid(z))
    # A softmax config is refused, with the key that would fix it.
    with pytest.raises(ConversionError, match="USE_SIGMOID_CE"):
        convert_checkpoint(
            ckpt, str(tmp_path / "softmax.pth"), _config(tmp_path, "s", MASK_ON=False)
        )


# ------------------------------------------------------------------------------ mmdet 1.x


def test_mmdet1_background_first(tmp_path):
    # Class-specific regression and mask logits keep a background slot first in mmdet 1.x.
    src = mmdet_state("mmdet1", C + 1, 4 * (C + 1), mask_channels=C + 1)
    ckpt = _save(
        tmp_path / "in.pth",
        {"state_dict": src, "meta": {"CLASSES": tuple(NAMES), "config": V1_TEXT}},
    )
    result = convert_checkpoint(ckpt, str(tmp_path / "v1.pth"), _config(tmp_path))
    assert result.layout == "mmdet1"
    cfg, model = _load_converted(result)
    assert cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE == "ROIAlign"
    assert cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO == 2
    assert cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE == "ROIAlign"
    assert cfg.MODEL.ANCHOR_GENERATOR.OFFSET == 0.5
    assert "+1" in open(result.yaml_path).read()  # the legacy box convention is stated
    _check_renamed(src, model, "")
    x, _, deltas, probs = _heads(model)
    z = x @ src["bbox_head.fc_cls.weight"].T + src["bbox_head.fc_cls.bias"]
    p = F.softmax(z, dim=1)
    torch.testing.assert_close(probs, torch.cat([p[:, 1:], p[:, :1]], dim=1))
    reg = x @ src["bbox_head.fc_reg.weight"].T + src["bbox_head.fc_reg.bias"]
    for k in range(C):  # class k of detectron2 is class k + 1 of mmdet 1.x
        torch.testing.assert_close(deltas[:, 4 * k : 4 * k + 4], reg[:, 4 * (k + 1) : 4 * (k + 2)])
    feat = _mask_input()
    with torch.no_grad():
        logits = model.roi_heads.mask_head.predictor(feat)
    full = F.conv2d(feat, src["mask_head.conv_logits.weight"], src["mask_head.conv_logits.bias"])
    torch.testing.assert_close(logits, full[:, 1:])


def test_mmdet1_bags_grouped_classifier(tmp_path):
    # K = C + N + 2 = 12 logits, the authors' slices: G0 [bg, fg] at 0; [others, classes in
    # ascending id] for G1 = {0, 2} at 2, G2 = {1, 5} at 5, G3 = {3} at 8, G4 = {4} at 10.
    src = mmdet_state("mmdet1", 12, 4 * (C + 1))  # BAGS' Faster R-CNN R50
    ckpt = _save(tmp_path / "in.pth", {"state_dict": src, "meta": {"CLASSES": tuple(NAMES)}})
    config = _config(
        tmp_path,
        MASK_ON=False,
        LONGTAIL={"PREDICTOR": "BAGSOutputLayers", "CLASS_STATS_PATH": _stats_json(tmp_path)},
    )
    result = convert_checkpoint(ckpt, str(tmp_path / "bags.pth"), config)
    _, model = _load_converted(result)
    x, _, deltas, probs = _heads(model)
    z = x @ src["bbox_head.fc_cls.weight"].T + src["bbox_head.fc_cls.bias"]
    q = F.softmax(z[:, 0:2], dim=1)
    expected = torch.zeros(R, C + 1)
    for start, classes in ((2, [0, 2]), (5, [1, 5]), (8, [3]), (10, [4])):
        group = F.softmax(z[:, start : start + 1 + len(classes)], dim=1)
        for pos, cls in enumerate(classes, start=1):
            expected[:, cls] = q[:, 1] * group[:, pos]
    expected[:, C] = q[:, 0]
    torch.testing.assert_close(probs, expected)
    reg = x @ src["bbox_head.fc_reg.weight"].T + src["bbox_head.fc_reg.bias"]
    torch.testing.assert_close(deltas, reg[:, 4:])


# ------------------------------------------------------------------------------ failures


@pytest.fixture
def softmax_case(tmp_path):
    """(state, checkpoint writer, config) of the plain mmdet 2.x softmax model."""
    src = mmdet_state("mmdet2", C + 1, 4 * C, mask_channels=C)

    def write(state, names=tuple(NAMES), name="in.pth"):
        return _save(tmp_path / name, {"state_dict": state, "meta": {"CLASSES": tuple(names)}})

    return src, write, _config(tmp_path)


def test_an_unknown_key_fails_with_its_name(tmp_path, softmax_case):
    src, write, config = softmax_case
    src["roi_head.bbox_head.fc_extra.weight"] = torch.zeros(3, 3)
    with pytest.raises(ConversionError, match=r"roi_head\.bbox_head\.fc_extra\.weight"):
        convert_checkpoint(write(src), str(tmp_path / "out.pth"), config)
    assert not os.path.exists(tmp_path / "out.pth")
    # ... unless it is dropped on purpose.
    result = convert_checkpoint(write(src), str(tmp_path / "out.pth"), config, drop=[r"fc_extra"])
    assert ("roi_head.bbox_head.fc_extra.weight", "matches --drop 'fc_extra'") in result.dropped


def test_a_missing_key_fails_with_the_model_key(tmp_path, softmax_case):
    src, write, config = softmax_case
    del src["backbone.layer2.1.conv2.weight"]
    with pytest.raises(ConversionError, match=r"backbone\.bottom_up\.res3\.1\.conv2\.weight"):
        convert_checkpoint(write(src), str(tmp_path / "out.pth"), config)


def test_class_names_are_checked_and_can_reorder(tmp_path, softmax_case):
    src, write, config = softmax_case
    order = [2, 1, 0, 3, 5, 4]  # the checkpoint's class i is NAMES[order[i]]
    swapped = [NAMES[i] for i in order]
    ckpt = write(src, names=swapped)
    with pytest.raises(
        ConversionError, match=r"0: checkpoint 'cat' vs convert_mmdet_test_classes 'ant'"
    ):
        convert_checkpoint(ckpt, str(tmp_path / "out.pth"), config)
    result = convert_checkpoint(ckpt, str(tmp_path / "out.pth"), config, class_order="by-name")
    _, model = _load_converted(result)
    x, _, deltas, probs = _heads(model)
    z = x @ src["roi_head.bbox_head.fc_cls.weight"].T + src["roi_head.bbox_head.fc_cls.bias"]
    p = F.softmax(z, dim=1)
    reg = x @ src["roi_head.bbox_head.fc_reg.weight"].T + src["roi_head.bbox_head.fc_reg.bias"]
    for k, name in enumerate(NAMES):
        i = swapped.index(name)
        torch.testing.assert_close(probs[:, k], p[:, i])
        torch.testing.assert_close(deltas[:, 4 * k : 4 * k + 4], reg[:, 4 * i : 4 * i + 4])
    torch.testing.assert_close(probs[:, C], p[:, C])


def test_existing_outputs_are_not_overwritten(tmp_path, softmax_case):
    src, write, config = softmax_case
    ckpt, out = write(src), str(tmp_path / "out.pth")
    convert_checkpoint(ckpt, out, config)
    with pytest.raises(ConversionError, match=r"out\.pth already exists; pass --overwrite"):
        convert_checkpoint(ckpt, out, config)
    os.remove(out)
    with pytest.raises(ConversionError, match=r"out\.yaml already exists"):
        convert_checkpoint(ckpt, out, config)
    convert_checkpoint(ckpt, out, config, overwrite=True)


def test_backbone_style_and_normalisation(tmp_path):
    src = mmdet_state("mmdet2", C + 1, 4 * C, mask_channels=C)
    text = V2_TEXT.format(cls="", mask="")
    ckpt = _save(tmp_path / "in.pth", {"state_dict": src, "meta": {"config": text}})
    with pytest.raises(ConversionError, match="contradicts"):
        convert_checkpoint(ckpt, str(tmp_path / "out.pth"), _config(tmp_path), style="caffe")
    # A caffe-style model (as its recorded config says): stride in the 1x1 conv, BGR, std 1.
    caffe = text.replace("'pytorch'", "'caffe'").replace(
        "mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True",
        "mean=[102.9801, 115.9465, 122.7717], std=[1.0, 1.0, 1.0], to_rgb=False",
    )
    assert caffe.count("caffe") == 1 and "to_rgb=False" in caffe
    ckpt = _save(tmp_path / "caffe.pth", {"state_dict": src, "meta": {"config": caffe}})
    result = convert_checkpoint(ckpt, str(tmp_path / "caffe_out.pth"), _config(tmp_path))
    cfg, _ = _load_converted(result)
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 and cfg.INPUT.FORMAT == "BGR"
    assert list(cfg.MODEL.PIXEL_MEAN) == [102.9801, 115.9465, 122.7717]
    assert list(cfg.MODEL.PIXEL_STD) == [1.0, 1.0, 1.0]


def test_mmdetection_spellings_of_lvis_classes_are_accepted():
    # mmdetection names LVIS classes by `name` and fixed a typo; detectron2 by the first synonym.
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    cfg = get_cfg()
    cfg.DATASETS.TEST = ("lvis_v1_val",)
    names = [c["name"] for c in sorted(LVIS_CATEGORIES, key=lambda c: c["id"])]
    mmdet = [n.replace("speaker_(stero_equipment)", "speaker_(stereo_equipment)") for n in names]
    assert "bull" in mmdet and "bull" not in MetadataCatalog.get("lvis_v1_val").thing_classes
    assert convert_mmdet._class_permutation(mmdet, cfg, "check", "ckpt") is None
    mmdet[10] = "not_an_lvis_class"
    with pytest.raises(ConversionError, match="10: checkpoint 'not_an_lvis_class' vs lvis_v1_val"):
        convert_mmdet._class_permutation(mmdet, cfg, "check", "ckpt")


# ------------------------------------------------------------------------------ released configs

RELEASED = sorted(glob.glob(os.path.join(REPO, "configs", "released", "*.yaml")))


def test_released_configs_load_and_say_how_to_convert():
    assert len(RELEASED) >= 20
    for path in RELEASED:
        cfg = get_cfg()
        add_longtail_config(cfg)
        cfg.merge_from_file(path)
        text = open(path).read()
        assert "python -m longtail.tools.convert_mmdet" in text, path
        assert "--eval-only" in text and "Source:" in text, path
