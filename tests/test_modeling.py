"""LongTailROIHeads with the default predictor is the stock detectron2 model: same parameters, same
losses, same gradients and same detections as StandardROIHeads, for softmax CE and for sigmoid CE +
federated loss. Runs the quick config (R18-FPN, 128 px) on two shapes-lt training images."""

import copy
import math
import os

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.utils.events import EventStorage

from longtail import LongTailROIHeads, add_longtail_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO, "configs", "quick_schedules", "ce_instant_test.yaml")
# The sigmoid CE + federated loss baseline, with the values of configs/ShapesLT/fed_*.yaml
# (upstream's default of 50 federated classes cannot be sampled from 30 classes).
# fmt: off
FED = [
    "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", True,
    "MODEL.ROI_BOX_HEAD.USE_FED_LOSS", True,
    "MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES", 10,
    "MODEL.ROI_BOX_HEAD.FED_LOSS_FREQ_WEIGHT_POWER", 0.5,
]
# fmt: on
LOSS_KEYS = {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}
BASELINES = pytest.mark.parametrize("opts", [[], FED], ids=["softmax_ce", "sigmoid_ce_fed"])


def _cfg(roi_heads, opts):
    cfg = get_cfg()
    add_longtail_config(cfg)
    cfg.merge_from_file(QUICK)
    cfg.merge_from_list(["MODEL.ROI_HEADS.NAME", roi_heads, "MODEL.DEVICE", "cpu", *opts])
    return cfg


def _batch(cfg, records, is_train):
    np.random.seed(0)  # DatasetMapper's RandomFlip draws from numpy
    mapper = DatasetMapper(cfg, is_train=is_train)
    return [mapper(copy.deepcopy(r)) for r in records]


def _losses(model, batch):
    model.train()
    torch.manual_seed(42)  # RPN/ROI sampling and the federated classes draw from torch's RNG
    with EventStorage():
        losses = model(copy.deepcopy(batch))
    model.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


@torch.no_grad()
def _detections(model, batch):
    model.eval()
    return [out["instances"] for out in model(copy.deepcopy(batch))]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a small shared CPU, two threads contending with another process
    made a forward/backward about 15x slower. Equality is exact either way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def records(shapes_lt_root):
    return copy.deepcopy(DatasetCatalog.get("shapes_lt_train")[:2])


def _stock_and_ours(opts):
    """The stock model and ours, ours holding the stock weights (init draws differ between them:
    upstream's _init_box_head builds a predictor that LongTailROIHeads then replaces)."""
    torch.manual_seed(0)
    stock = build_model(_cfg("StandardROIHeads", opts))
    ours = build_model(_cfg("LongTailROIHeads", opts))
    assert type(stock.roi_heads) is StandardROIHeads and type(ours.roi_heads) is LongTailROIHeads
    state = stock.state_dict()
    assert set(ours.state_dict()) == set(state)
    result = ours.load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    return stock, ours


@BASELINES
def test_default_predictor_is_upstreams(opts):
    stock, ours = _stock_and_ours(opts)
    a, b = stock.roi_heads.box_predictor, ours.roi_heads.box_predictor
    assert type(b) is FastRCNNOutputLayers
    for attr in (
        "num_classes",
        "smooth_l1_beta",
        "test_score_thresh",
        "test_nms_thresh",
        "test_topk_per_image",
        "box_reg_loss_type",
        "loss_weight",
        "use_fed_loss",
        "use_sigmoid_ce",
        "fed_loss_num_classes",
    ):
        assert getattr(b, attr) == getattr(a, attr), attr
    assert b.box2box_transform.weights == a.box2box_transform.weights
    assert b.use_sigmoid_ce == b.use_fed_loss == bool(opts)
    if opts:
        assert torch.equal(b.fed_loss_cls_weights, a.fed_loss_cls_weights)


@BASELINES
def test_losses_gradients_and_detections_equal_stock(records, opts):
    stock, ours = _stock_and_ours(opts)
    train_batch = _batch(_cfg("StandardROIHeads", opts), records, is_train=True)
    assert all(len(x["instances"]) > 0 for x in train_batch)

    stock_losses, stock_grads = _losses(stock, train_batch)
    our_losses, our_grads = _losses(ours, train_batch)
    assert set(stock_losses) == set(our_losses) == LOSS_KEYS
    for key, value in stock_losses.items():
        assert math.isfinite(value.item()) and value.item() > 0, key
        assert torch.equal(our_losses[key], value), (key, our_losses[key].item(), value.item())
    assert set(our_grads) == set(stock_grads)
    for name, grad in stock_grads.items():
        assert torch.equal(our_grads[name], grad), name

    # Both trained the BN statistics identically in train mode, so eval must agree too.
    eval_batch = _batch(_cfg("StandardROIHeads", opts), records, is_train=False)
    stock_out, our_out = _detections(stock, eval_batch), _detections(ours, eval_batch)
    assert len(stock_out) == len(our_out) == 2
    for a, b in zip(stock_out, our_out):
        assert len(a) > 0 and a.image_size == b.image_size
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores)
        assert torch.equal(a.pred_classes, b.pred_classes)
        assert torch.equal(a.pred_masks, b.pred_masks)


@BASELINES
def test_empty_batch_gives_finite_losses_that_backprop(records, opts):
    cfg = _cfg("LongTailROIHeads", opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    empty = [dict(r, annotations=[]) for r in records]
    batch = _batch(cfg, empty, is_train=True)
    assert all(len(x["instances"]) == 0 for x in batch)
    losses, grads = _losses(model, batch)
    assert set(losses) == LOSS_KEYS
    for key, value in losses.items():
        assert math.isfinite(value.item()), key
    # No foreground: nothing to regress or segment, but the classifiers still learn "background".
    assert losses["loss_box_reg"].item() == 0 and losses["loss_mask"].item() == 0
    assert losses["loss_cls"].item() > 0 and losses["loss_rpn_cls"].item() > 0
    predictor = model.roi_heads.box_predictor
    assert grads["roi_heads.box_predictor.cls_score.weight"].abs().sum() > 0
    assert predictor.cls_score.weight.grad is not None
    assert all(torch.isfinite(g).all() for g in grads.values())
