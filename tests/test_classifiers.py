"""The cosine classification layers (longtail/modeling/classifiers.py): CosineLinear and
CosineConv2d1x1 against independent computations and the properties the specs state
(seesaw.md §6 item 7 and Ex 5), the registered CosineMaskRCNNConvUpsampleHead against upstream's
head, and build_box_classifier."""

import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY, build_mask_head
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage
from torch import nn
from torch.nn import functional as F

from longtail import add_longtail_config
from longtail.modeling.classifiers import (
    CosineConv2d1x1,
    CosineLinear,
    CosineMaskRCNNConvUpsampleHead,
    build_box_classifier,
)

NUM_CLASSES = 3
INPUT_SHAPE = ShapeSpec(channels=8, height=14, width=14)
IMAGE_SIZE = (32, 32)


def _cosine_reference(x, weight, bias, scale):
    """scale * cos(x_r, w_k) + b_k via F.normalize (lower-clamp eps), (R, D) x (K, D) -> (R, K)."""
    return scale * F.normalize(x, dim=1) @ F.normalize(weight, dim=1).t() + bias


def _randomize(layer, seed=0):
    """Give a layer non-trivial weights and biases (the default bias 0 hides bias mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=layer.weight.dtype))
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g, dtype=layer.bias.dtype))
    return layer


# ---------------------------------------------------------------------------------------------
# CosineLinear


def test_cosine_linear_matches_f_normalize_reference():
    torch.manual_seed(0)
    # eps = 0 makes the layer exactly the cosine, so F.normalize (whose eps only clamps tiny norms)
    # is an independent reference; float64 so that 1e-6 measures the formula, not rounding.
    layer = _randomize(CosineLinear(16, 5, scale=20.0, eps=0.0)).double()
    x = torch.randn(7, 16, dtype=torch.float64) * 3
    ref = _cosine_reference(x, layer.weight, layer.bias, 20.0)
    torch.testing.assert_close(layer(x), ref, atol=1e-6, rtol=0)


def test_cosine_linear_eps_is_added_to_the_norms():
    # The specs' (mmdet's) form: x / (||x|| + eps), w / (||w|| + eps), bias unscaled.
    torch.manual_seed(1)
    eps = 1e-2  # large so that a clamp-vs-add mix-up would show
    layer = _randomize(CosineLinear(6, 4, scale=8.0, eps=eps)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    x_n = x / (x.norm(dim=1, keepdim=True) + eps)
    w_n = layer.weight / (layer.weight.norm(dim=1, keepdim=True) + eps)
    ref = 8.0 * x_n @ w_n.t() + layer.bias
    torch.testing.assert_close(layer(x), ref, atol=1e-12, rtol=0)


def test_cosine_linear_seesaw_worked_example():
    # specs/seesaw.md Ex 5: x = [3, 4], W rows [1, 0], [0, 2], [-1, -1], b = [0, .5, 0], tau = 20.
    # Without eps: z = 20 * [3/5, 4/5, -7/(5*sqrt 2)] + b = [12, 16.5, -19.798990].
    x = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    for eps, expected in [
        (0.0, [12.0, 16.5, -19.798990]),
        (1e-6, [11.999986, 16.499989, -19.798972]),
    ]:
        layer = CosineLinear(2, 3, scale=20.0, eps=eps).double()
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]]))
            layer.bias.copy_(torch.tensor([0.0, 0.5, 0.0]))
        torch.testing.assert_close(
            layer(x), torch.tensor([expected], dtype=torch.float64), atol=1e-6, rtol=0
        )


def test_cosine_linear_bounded_and_scale_invariant():
    torch.manual_seed(2)
    layer = _randomize(CosineLinear(32, 10, scale=20.0))
    x = torch.randn(50, 32) * 100
    z = layer(x)
    assert z.shape == (50, 10)
    assert ((z - layer.bias).abs() <= 20.0 + 1e-4).all()
    # Rescaling the input, or one class's weight row, by c > 0 leaves the logits unchanged.
    torch.testing.assert_close(layer(7 * (x / 100)), z, atol=1e-5, rtol=0)
    with torch.no_grad():
        layer.weight[3] *= 13.0
    torch.testing.assert_close(layer(x), z, atol=1e-5, rtol=0)


def test_cosine_linear_zero_row_empty_batch_and_gradients():
    torch.manual_seed(3)
    layer = _randomize(CosineLinear(8, 4, scale=20.0))
    x = torch.randn(3, 8)
    x[1] = 0.0  # e.g. a RoI whose post-ReLU fc features are all zero
    x.requires_grad_(True)
    z = layer(x)
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z[1], layer.bias.detach())  # cos = 0 -> just the bias
    (z * torch.randn_like(z)).sum().backward()
    for t in (x.grad, layer.weight.grad, layer.bias.grad):
        assert torch.isfinite(t).all()
    assert layer.weight.grad.abs().sum() > 0 and x.grad[0].abs().sum() > 0

    empty = layer(torch.zeros(0, 8))
    assert empty.shape == (0, 4)
    empty.sum().backward()  # the empty-batch graph still backprops


def test_cosine_linear_interface_and_init():
    torch.manual_seed(4)
    layer = CosineLinear(1024, 1204)  # ECM's LVIS box classifier: C+1 = 1204 outputs
    assert (layer.in_features, layer.out_features) == (1024, 1204)
    assert layer.weight.shape == (1204, 1024) and layer.bias.shape == (1204,)
    assert abs(layer.weight.std().item() - 0.01) < 5e-4 and (layer.bias == 0).all()
    assert set(layer.state_dict()) == set(nn.Linear(1024, 1204).state_dict())
    no_bias = CosineLinear(4, 3, scale=8.0, bias=False)  # e.g. IIF's T = 8, a bias-free variant
    assert no_bias.bias is None and list(no_bias.state_dict()) == ["weight"]
    z = no_bias(torch.randn(5, 4))
    assert (z.abs() <= 8.0 + 1e-5).all()
    with pytest.raises(ValueError, match="scale"):
        CosineLinear(4, 3, scale=0.0)


# ---------------------------------------------------------------------------------------------
# CosineConv2d1x1


def test_cosine_conv_matches_f_normalize_reference():
    torch.manual_seed(5)
    conv = _randomize(CosineConv2d1x1(6, 4, scale=20.0, eps=0.0)).double()
    x = torch.randn(2, 6, 5, 3, dtype=torch.float64)
    # Every pixel is a row of a (N*H*W, Cin) matrix; each filter a row of (M, Cin).
    rows = x.permute(0, 2, 3, 1).reshape(-1, 6)
    ref = _cosine_reference(rows, conv.weight.reshape(4, 6), conv.bias, 20.0)
    ref = ref.reshape(2, 5, 3, 4).permute(0, 3, 1, 2)
    torch.testing.assert_close(conv(x), ref, atol=1e-6, rtol=0)


def test_cosine_conv_properties():
    torch.manual_seed(6)
    conv = _randomize(CosineConv2d1x1(8, 3, scale=20.0))
    assert (conv.in_channels, conv.out_channels) == (8, 3)
    assert conv.weight.shape == (3, 8, 1, 1) and conv.bias.shape == (3,)
    x = torch.randn(4, 8, 7, 7) * 50
    x[1, :, 2, 3] = 0.0  # an all-zero pixel
    x.requires_grad_(True)
    z = conv(x)
    assert z.shape == (4, 3, 7, 7) and torch.isfinite(z).all()
    bias = conv.bias.detach().view(1, 3, 1, 1)
    assert ((z - bias).abs() <= 20.0 + 1e-4).all()
    torch.testing.assert_close(z[1, :, 2, 3], conv.bias.detach())
    torch.testing.assert_close(conv(7 * x), z, atol=1e-5, rtol=0)
    (z * torch.randn_like(z)).sum().backward()
    for t in (x.grad, conv.weight.grad, conv.bias.grad):
        assert torch.isfinite(t).all() and t.abs().sum() > 0

    empty = conv(torch.zeros(0, 8, 7, 7, requires_grad=True))
    assert empty.shape == (0, 3, 7, 7)
    empty.sum().backward()


# ---------------------------------------------------------------------------------------------
# CosineMaskRCNNConvUpsampleHead


def _mask_cfg(name, cosine_scale=20.0):
    cfg = get_cfg()
    add_longtail_config(cfg)
    # Set (or, on a config that lacks the key, add) tau of the cosine logit conv.
    cfg.MODEL.LONGTAIL.MASK_COSINE_SCALE = cosine_scale
    cfg.MODEL.ROI_MASK_HEAD.NAME = name
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 2
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 8
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = NUM_CLASSES
    return cfg


def _cosine_head(cosine_scale=20.0):
    torch.manual_seed(7)
    return build_mask_head(_mask_cfg("CosineMaskRCNNConvUpsampleHead", cosine_scale), INPUT_SHAPE)


def _square(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _train_instances():
    """Two images, 2 + 1 RoIs: one with BitMasks, one with PolygonMasks (mask_rcnn_loss crops
    gt_masks to proposal_boxes and reads gt_classes)."""
    a = Instances(IMAGE_SIZE)
    a.proposal_boxes = Boxes(torch.tensor([[2.0, 2.0, 20.0, 20.0], [10.0, 4.0, 30.0, 28.0]]))
    a.gt_classes = torch.tensor([0, 2])
    bitmasks = torch.zeros(2, *IMAGE_SIZE, dtype=torch.bool)
    bitmasks[0, 4:18, 4:16] = True
    bitmasks[1, 8:26, 12:28] = True
    a.gt_masks = BitMasks(bitmasks)
    b = Instances(IMAGE_SIZE)
    b.proposal_boxes = Boxes(torch.tensor([[0.0, 0.0, 16.0, 16.0]]))
    b.gt_classes = torch.tensor([1])
    b.gt_masks = PolygonMasks([_square(2, 2, 12, 14)])
    return [a, b]


def test_mask_head_registered_and_built_from_cfg():
    assert ROI_MASK_HEAD_REGISTRY.get("CosineMaskRCNNConvUpsampleHead") is (
        CosineMaskRCNNConvUpsampleHead
    )
    head = _cosine_head(cosine_scale=8.0)
    assert isinstance(head, CosineMaskRCNNConvUpsampleHead)
    assert isinstance(head.predictor, CosineConv2d1x1)
    assert head.predictor.scale == 8.0
    assert (head.predictor.in_channels, head.predictor.out_channels) == (8, NUM_CLASSES)
    # The predictor keeps its place in the nn.Sequential, so upstream's layers() runs it last.
    assert list(head)[-1] is head.predictor
    cfg = _mask_cfg("CosineMaskRCNNConvUpsampleHead")
    cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK = True
    assert build_mask_head(cfg, INPUT_SHAPE).predictor.out_channels == 1


def test_mask_head_state_dict_matches_upstream():
    head = _cosine_head()
    upstream = build_mask_head(_mask_cfg("MaskRCNNConvUpsampleHead"), INPUT_SHAPE)
    ours, theirs = head.state_dict(), upstream.state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    head.load_state_dict(theirs)  # strict: an upstream mask head checkpoint maps 1:1


def test_mask_head_training_loss_backprops():
    head = _cosine_head().train()
    instances = _train_instances()
    x = torch.randn(3, INPUT_SHAPE.channels, INPUT_SHAPE.height, INPUT_SHAPE.width)
    with EventStorage():
        losses = head(x, instances)
    assert set(losses) == {"loss_mask"}
    loss = losses["loss_mask"]
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    for name in ("weight", "bias"):
        grad = getattr(head.predictor, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert head.mask_fcn1.weight.grad.abs().sum() > 0  # the gradient reaches the convs

    # No RoIs in the batch: the loss is a graph-connected zero.
    head.zero_grad()
    empty = Instances(IMAGE_SIZE)
    empty.proposal_boxes = Boxes(torch.zeros(0, 4))
    empty.gt_classes = torch.zeros(0, dtype=torch.long)
    empty.gt_masks = BitMasks(torch.zeros(0, *IMAGE_SIZE, dtype=torch.bool))
    with EventStorage():
        loss = head(torch.zeros(0, 8, 14, 14), [empty])["loss_mask"]
    assert loss.item() == 0.0
    loss.backward()


def test_mask_head_inference_pred_masks():
    head = _cosine_head().eval()
    inst = Instances(IMAGE_SIZE)
    inst.pred_boxes = Boxes(torch.tensor([[2.0, 2.0, 20.0, 20.0], [0.0, 0.0, 16.0, 16.0]]))
    inst.pred_classes = torch.tensor([2, 0])
    with torch.no_grad():
        (out,) = head(torch.randn(2, 8, 14, 14), [inst])
    masks = out.pred_masks
    assert masks.shape == (2, 1, 28, 28)
    assert ((masks >= 0) & (masks <= 1)).all()


# ---------------------------------------------------------------------------------------------
# build_box_classifier


def test_build_box_classifier_kinds_and_error():
    torch.manual_seed(8)
    linear = build_box_classifier("linear", 256, 1001, 20.0)
    assert type(linear) is nn.Linear
    assert (linear.in_features, linear.out_features) == (256, 1001)
    assert abs(linear.weight.std().item() - 0.01) < 5e-4 and (linear.bias == 0).all()

    cosine = build_box_classifier("cosine", 256, 1001, 8.0)
    assert isinstance(cosine, CosineLinear)
    assert (cosine.in_features, cosine.out_features, cosine.scale) == (256, 1001, 8.0)
    assert build_box_classifier("cosine", 4, 3).scale == 20.0
    assert math.isfinite(cosine(torch.zeros(2, 256)).sum().item())

    with pytest.raises(ValueError, match="'linear', 'cosine'"):
        build_box_classifier("normed", 4, 3, 20.0)
