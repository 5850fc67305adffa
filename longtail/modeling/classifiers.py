"""Cosine (normalised) classification layers: the box classifier and the mask logit conv.

Several recipes replace the last dot-product layer of a head by a scaled cosine similarity
(mmdet's ``NormedLinear`` / ``NormedConv2d``):

- ECM (specs/ecm.md §5): box ``cls_score`` with τ = 20 and C+1 outputs; mask 1x1 logit conv,
  τ = 20.
- Seesaw (specs/seesaw.md §2.6): box classifier with τ = 20 and C+2 outputs (classes + objectness
  pair); "Norm Mask" 1x1 logit conv, τ = 20.
- IIF (specs/iif.md §3): box classifier with T = 8 in the final configs (20 in one intermediate
  config); normalised mask predictor, T = 20.

All of them are ``scale * <x/(||x|| + eps), w_c/(||w_c|| + eps)> + b_c`` with eps = 1e-6, the bias
added after scaling, so one class per layer type covers them through ``scale`` / ``bias`` / ``eps``.

Shape shorthand:
    R: number of RoIs (box head inputs); may be 0.
    D: input feature dimension of the box classifier.
    K: number of classifier outputs (C+1 for softmax/ECM with background last, C+2 for Seesaw).
    N, Cin, H, W: mask head batch (RoIs), input channels and spatial size; N may be 0.
    M: number of mask classes (C, or 1 for class-agnostic masks).

What this module provides:
    CosineLinear                    the box classifier (swapped into ``cls_score``).
    CosineConv2d1x1                 the normalised 1x1 mask logit conv.
    CosineMaskRCNNConvUpsampleHead  detectron2's mask head with that conv as ``predictor``,
                                    registered in ``ROI_MASK_HEAD_REGISTRY``.
    build_box_classifier            "linear" | "cosine" factory used by the predictors.
"""
import math

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.mask_head import (
    ROI_MASK_HEAD_REGISTRY,
    MaskRCNNConvUpsampleHead,
)
from torch import nn
from torch.nn import functional as F

__all__ = [
    "BOX_CLASSIFIER_KINDS",
    "CosineConv2d1x1",
    "CosineLinear",
    "CosineMaskRCNNConvUpsampleHead",
    "build_box_classifier",
]

BOX_CLASSIFIER_KINDS = ("linear", "cosine")


def _normalize(t: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    """``t / (||t||_2 + eps)`` along ``dim``.

    The eps is *added* to the norm (mmdet's form, which the specs quote) rather than used as a
    lower clamp (``F.normalize``): the two differ by a relative ~eps/||t||, which is what moves
    spec seesaw.md Ex 5 from 12 to 11.999986. Either keeps an all-zero row finite (it maps to 0).
    """
    return t / (t.norm(p=2, dim=dim, keepdim=True) + eps)


class CosineLinear(nn.Module):
    """Scaled cosine classifier: ``logits[r, k] = scale * cos(x_r, w_k) + b_k``.

    Because both the feature and the class weight are L2-normalised, ``|logits - bias| <= scale``
    and the logits are invariant to rescaling either ``x_r`` or ``w_k`` by a positive factor: a
    class cannot win by a large weight norm, which is what a frequent class otherwise gets under
    long-tailed training.

    The parameters are named and shaped like :class:`torch.nn.Linear` (``weight`` (K, D),
    ``bias`` (K,)) and ``in_features`` / ``out_features`` are exposed, so detectron2 code that reads
    ``cls_score.out_features`` works and checkpoints of a linear ``cls_score`` load 1:1. It is
    deliberately not a ``nn.Linear`` subclass, so code that re-initialises "every nn.Linear" does
    not silently treat it as one.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scale: float = 20.0,
        bias: bool = True,
        eps: float = 1e-6,
    ):
        """
        Args:
            in_features: D, the input feature dimension.
            out_features: K, the number of logits.
            scale: the temperature τ multiplying the cosine (ECM/Seesaw 20, IIF final configs 8).
            bias: whether to add a learned per-class bias (not scaled by τ).
            eps: added to both norms so that an all-zero input row gives finite logits (= bias).
        """
        super().__init__()
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"CosineLinear: scale must be finite and > 0, got {scale}")
        self.in_features = in_features
        self.out_features = out_features
        self.scale = float(scale)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights N(0, 0.01), bias 0: the recipes' NormedLinear init (specs/ecm.md §5,
        seesaw.md §2.6). The forward pass ignores the weight norm, but the norm sets the step size
        of the direction update (the gradient w.r.t. w scales as 1/||w||), so keep this init."""
        nn.init.normal_(self.weight, mean=0.0, std=0.01)
        if self.bias is not None:
            nn.init.constant_(self.bias, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (R, D) features (any leading dims work: (..., D)); R may be 0.

        Returns:
            (R, K) logits (or (..., K)).
        """
        x_n = _normalize(x, dim=-1, eps=self.eps)
        w_n = _normalize(self.weight, dim=1, eps=self.eps)
        # Scale the normalised input rather than the product so the bias stays unscaled.
        return F.linear(x_n * self.scale, w_n, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"scale={self.scale}, bias={self.bias is not None}, eps={self.eps}"
        )


class CosineConv2d1x1(CosineLinear):
    """1x1 conv whose per-pixel logits are ``scale * cos(f[n, :, i, j], w_m) + b_m``.

    The feature vector of each pixel is L2-normalised over channels and each output filter over its
    input channels ("Norm Mask", specs/seesaw.md §2.6; ecm.md §5). ``weight`` is stored as
    (M, Cin, 1, 1) and ``bias`` as (M,), the shapes and names of detectron2's mask ``predictor``
    conv, so a mask head checkpoint maps 1:1. ``in_channels`` / ``out_channels`` are exposed like
    ``nn.Conv2d``. It is :class:`CosineLinear` applied at every pixel: same arguments, same
    normalisation; only the weight's shape, the init and the forward's layout differ.

    Init: kaiming-normal (fan_out, ReLU gain) weights and bias 0. That is the init mmdet's
    FCNMaskHead applies to its ``conv_logits`` (seesaw.md §2.6), and the ECM, Seesaw and IIF
    numbers were all trained with it. detectron2's N(0, 0.001) for its dot-product predictor is
    not used: the cosine forward ignores the weight norm, and a norm ~100x smaller would make the
    effective step on the weight direction (gradient ~ 1/||w||, update relative to ||w||) ~10^4x
    larger than in the reference recipes.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        scale: float = 20.0,
        bias: bool = True,
        eps: float = 1e-6,
    ):
        """Arguments as :class:`CosineLinear` (in_channels = Cin, out_channels = M)."""
        super().__init__(in_channels, out_channels, scale=scale, bias=bias, eps=eps)
        # detectron2's mask predictor stores its 1x1 kernel as (M, Cin, 1, 1).
        self.weight = nn.Parameter(self.weight.detach().view(out_channels, in_channels, 1, 1))

    @property
    def in_channels(self) -> int:
        return self.in_features

    @property
    def out_channels(self) -> int:
        return self.out_features

    def reset_parameters(self) -> None:
        """Kaiming-normal fan_out weights, bias 0 (see the class docstring for why)."""
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        if self.bias is not None:
            nn.init.constant_(self.bias, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (N, Cin, H, W) features; N may be 0.

        Returns:
            (N, M, H, W) logits.
        """
        x_n = _normalize(x, dim=1, eps=self.eps)
        # For a 1x1 kernel, the norm over dim 1 is the norm over the whole filter.
        w_n = _normalize(self.weight, dim=1, eps=self.eps)
        return F.conv2d(x_n * self.scale, w_n, self.bias)


@ROI_MASK_HEAD_REGISTRY.register()
class CosineMaskRCNNConvUpsampleHead(MaskRCNNConvUpsampleHead):
    """detectron2's :class:`MaskRCNNConvUpsampleHead` with a cosine 1x1 logit conv.

    Convs, deconv, loss and inference are upstream's; only ``predictor`` becomes a
    :class:`CosineConv2d1x1` with the same in/out channels and parameter names, so state dicts of
    the two heads have identical keys and shapes. Select it with
    ``MODEL.ROI_MASK_HEAD.NAME: CosineMaskRCNNConvUpsampleHead``; τ is
    ``MODEL.LONGTAIL.MASK_COSINE_SCALE`` (the box classifier has its own, ``COSINE_SCALE``).
    """

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, cosine_scale: float = 20.0, **kwargs):
        """
        Args:
            input_shape: shape of the (N, Cin, H, W) RoI features.
            cosine_scale: τ of the cosine logit conv.
            kwargs: upstream's arguments (``num_classes``, ``conv_dims``, ``conv_norm``, loss
                weight, vis period); see :class:`MaskRCNNConvUpsampleHead`.
        """
        super().__init__(input_shape, **kwargs)
        upstream = self.predictor
        # Re-assigning an existing child keeps its slot in the nn.Sequential order, so the
        # upstream `layers()` still runs it last.
        self.predictor = CosineConv2d1x1(
            upstream.in_channels,
            upstream.out_channels,
            scale=cosine_scale,
            bias=upstream.bias is not None,
        )

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["cosine_scale"] = cfg.MODEL.LONGTAIL.MASK_COSINE_SCALE
        return ret


def build_box_classifier(
    kind: str, in_features: int, num_outputs: int, scale: float = 20.0
) -> nn.Module:
    """Build the box classification layer (``cls_score``) of a predictor.

    Args:
        kind: "linear" (a dot-product ``nn.Linear`` with detectron2's ``cls_score`` init,
            N(0, 0.01) weights and bias 0) or "cosine" (:class:`CosineLinear`); usually
            ``cfg.MODEL.LONGTAIL.CLASSIFIER``.
        in_features: D.
        num_outputs: K (e.g. C+1 with background last).
        scale: τ of the cosine classifier; ignored for "linear".

    Returns:
        A module mapping (R, D) features to (R, K) logits, exposing ``in_features`` and
        ``out_features``.

    Raises:
        ValueError: for an unknown ``kind``.
    """
    if kind == "linear":
        layer = nn.Linear(in_features, num_outputs)
        # The same init as FastRCNNOutputLayers gives its cls_score.
        nn.init.normal_(layer.weight, std=0.01)
        nn.init.constant_(layer.bias, 0.0)
        return layer
    if kind == "cosine":
        return CosineLinear(in_features, num_outputs, scale=scale)
    raise ValueError(
        f"Unknown box classifier kind {kind!r} (MODEL.LONGTAIL.CLASSIFIER); "
        f"choose one of {', '.join(repr(k) for k in BOX_CLASSIFIER_KINDS)}."
    )
