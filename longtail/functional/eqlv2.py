"""EQL v2, Equalization Loss v2: gradient-driven weights, training loss, statistics and scores.

Reference: Tan, Lu, Zhang, Yin & Li, "Equalization Loss v2: A New Gradient Balance Approach for
Long-tailed Object Detection", CVPR 2021 (arXiv 2012.08548); behaviour follows the authors' code
(tztztztztz/eqlv2, ``mmdet/models/losses/eqlv2.py``), as described in the project's EQL v2 spec.

Shape shorthand used below:
    R: number of sampled RoIs in the loss call (fg + bg, may be 0).
    C: number of foreground classes. Every logit row, target row and weight vector has C+1
       entries; the last one (index C) is the background column, as in Detectron2's
       ``gt_classes`` convention. The gradient statistics have C entries (no background).

EQL v2 trains each of the C+1 logits as an independent sigmoid/BCE task. Column C is a
class-agnostic background detector (target 1 on bg RoIs, 0 on fg RoIs); ``1 - sigmoid(z_C)`` is
the objectness probability used at test time. For every foreground class j the caller keeps the
running sums ``P_j`` and ``Q_j`` of the gradient magnitudes that positives and negatives put on
logit j; their ratio ``g_j = P_j / Q_j`` sets the weights of the *next* call: a class with a low
ratio (the tail) gets its positive gradients boosted (``q_j`` up to ``1 + alpha``) and its
negative gradients damped (``r_j`` down to 0). The background column always has weight 1.

One training step, in this order (the statistics are the caller's buffers, all-reduced by it)::

    w = eqlv2_weights(P, Q)                              # from the statistics *before* this call
    loss = eqlv2_loss(logits, gt_classes, w.pos, w.neg)
    inc = eqlv2_grad_increments(logits, gt_classes, w.pos, w.neg)
    # all_reduce(SUM) torch.stack(inc) across ranks, then:
    P += inc.pos; Q += inc.neg

This module holds no state and calls no collective.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "EQLv2Weights",
    "EQLv2GradIncrements",
    "eqlv2_weights",
    "eqlv2_loss",
    "eqlv2_grad_increments",
    "eqlv2_probs",
]

#: Added to Q in ``g = P / (Q + 1e-10)``, as in the authors' code: a class with positives but no
#: negatives yet gets ``g ~ 1e10``, i.e. unit weights, instead of a division by zero.
_RATIO_EPS = 1e-10


class EQLv2Weights(NamedTuple):
    """Per-column EQL v2 weights; each field is a (C+1,) float64 tensor (background last, = 1).

    Attributes:
        pos: q = 1 + alpha * (1 - r), the weight of a column's positive (target 1) term, in
            [1, 1 + alpha].
        neg: r = f(g) = sigmoid(gamma * (g - mu)), the weight of a column's negative (target 0)
            term, in [0, 1].
    """

    pos: torch.Tensor
    neg: torch.Tensor


class EQLv2GradIncrements(NamedTuple):
    """One loss call's contribution to the EQL v2 statistics; each field is a (C,) tensor.

    Attributes:
        pos: p_j = sum_r G[r, j] * W[r, j] * T[r, j], the re-weighted gradient magnitude that
            positives put on logit j (add to the caller's P).
        neg: n_j = sum_r G[r, j] * W[r, j] * (1 - T[r, j]), the same for negatives (add to Q).
    """

    pos: torch.Tensor
    neg: torch.Tensor


def eqlv2_weights(
    pos_grad: torch.Tensor,
    neg_grad: torch.Tensor,
    gamma: float = 12.0,
    mu: float = 0.8,
    alpha: float = 4.0,
) -> EQLv2Weights:
    """EQL v2 positive / negative weights from the accumulated gradient statistics.

    ``g_j = P_j / (Q_j + 1e-10)``, ``r_j = 1 / (1 + exp(-gamma (g_j - mu)))``,
    ``q_j = 1 + alpha (1 - r_j)`` for j < C, and ``r_C = q_C = 1`` (the background column is never
    re-weighted and has no statistics).

    **No statistics yet**: when every entry of both P and Q is 0 (nothing accumulated), all weights
    are exactly 1, as in the authors' code (its first call has no statistics / a ratio buffer
    initialised to 100). Without this rule g = 0 would give every class q ~ 5, r ~ 7e-5 on the
    very first step. From the first non-empty call on, a single class with ``P_j = 0`` does get
    ``r ~ 6.8e-5`` and ``q ~ 5``: that is by design (spec §2.3, §7). The only difference from the
    reference is a run whose first calls are all empty across all ranks (R = 0 everywhere): the
    reference then already leaves unit weights, this function keeps them until the first RoI.

    Args:
        pos_grad: (C,) P, the accumulated positive gradient magnitudes (any float dtype;
            float64 or float32 buffers). Finite and >= 0.
        neg_grad: (C,) Q, the accumulated negative gradient magnitudes, same shape.
        gamma: steepness of the mapping f (code default 12). Finite.
        mu: centre of the mapping, f(mu) = 0.5 (code default 0.8). Finite.
        alpha: maximal positive boost, q in [1, 1 + alpha] (code default 4). Finite and >= 0.

    Returns:
        :class:`EQLv2Weights` of two (C+1,) float64 tensors on the statistics' device. float64
        keeps g exact when Q has grown to ~1e6 over a long schedule; the weights carry no
        gradient.

    Raises:
        ValueError: if the statistics are not two non-empty 1-D vectors of the same shape with
            finite, non-negative entries, or a hyperparameter is out of range.
    """
    for name, value in (("gamma", gamma), ("mu", mu), ("alpha", alpha)):
        if not math.isfinite(float(value)):
            raise ValueError(f"EQL v2 {name} must be finite, got {value!r}")
    if alpha < 0:
        raise ValueError(f"EQL v2 alpha must be >= 0 (it scales the positive boost), got {alpha!r}")
    if (
        not isinstance(pos_grad, torch.Tensor)
        or not isinstance(neg_grad, torch.Tensor)
        or pos_grad.dim() != 1
        or pos_grad.numel() == 0
        or neg_grad.shape != pos_grad.shape
    ):
        raise ValueError(
            "EQL v2 pos_grad and neg_grad must be two non-empty 1-D (C,) tensors of the same "
            f"shape (foreground classes only), got {_shape(pos_grad)} and {_shape(neg_grad)}"
        )
    with torch.no_grad():
        p = pos_grad.detach().to(torch.float64)
        n = neg_grad.detach().to(torch.float64)
        stats = torch.cat([p, n])
        if not bool(torch.isfinite(stats).all()) or bool((stats < 0).any()):
            raise ValueError(
                "EQL v2 pos_grad and neg_grad must be finite and >= 0 (sums of gradient "
                "magnitudes); check that the buffers are not half precision and not corrupted"
            )
        ratio = p / (n + _RATIO_EPS)
        neg_w = torch.sigmoid(gamma * (ratio - mu))
        pos_w = 1.0 + alpha * (1.0 - neg_w)
        # Unit weights while nothing has been accumulated; torch.where keeps this free of a
        # host sync.
        fresh = (stats == 0).all()
        neg_w = torch.where(fresh, torch.ones_like(neg_w), neg_w)
        pos_w = torch.where(fresh, torch.ones_like(pos_w), pos_w)
        one = p.new_ones(1)
        return EQLv2Weights(torch.cat([pos_w, one]), torch.cat([neg_w, one]))


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def _prepare(logits: torch.Tensor, targets: torch.Tensor, pos_w: torch.Tensor, neg_w: torch.Tensor):
    """Validated (z, T, pos_w, neg_w), all in the compute dtype (>= float32) on z's device."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(
            f"EQL v2 logits must be (R, C+1) with C >= 1 (background last), got {_shape(logits)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"EQL v2 logits must be a float tensor, got {logits.dtype}")
    num_rois, num_cols = logits.shape
    for name, w in (("pos_w", pos_w), ("neg_w", neg_w)):
        if not isinstance(w, torch.Tensor) or w.shape != (num_cols,):
            raise ValueError(
                f"EQL v2 {name} must be a ({num_cols},) tensor (C+1 weights from eqlv2_weights) "
                f"for logits of shape {tuple(logits.shape)}, got {_shape(w)}"
            )
    # Half-precision logits are upcast: a sum of C+1 (~1200) BCE terms per RoI, and
    # |sigmoid - target| near 0 or 1, lose too much in fp16/bf16 (spec §7).
    dtype = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(dtype)
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"EQL v2 targets must be a tensor, got {type(targets).__name__}")
    if targets.is_floating_point():
        if targets.shape != logits.shape:
            raise ValueError(
                f"EQL v2 dense targets must have the logits' shape {tuple(logits.shape)} (one "
                f"column per class plus background), got {tuple(targets.shape)}; pass (R,) int64 "
                "labels for one-hot targets"
            )
        t = targets.detach().to(device=z.device, dtype=dtype)
        if num_rois and not bool(((t >= 0) & (t <= 1)).all()):
            raise ValueError("EQL v2 dense targets must lie in [0, 1] (and not be NaN)")
    else:
        if targets.dtype == torch.bool or targets.shape != (num_rois,):
            raise ValueError(
                f"EQL v2 labels must be ({num_rois},) integers in [0, {num_cols - 1}] "
                f"({num_cols - 1} = background), or ({num_rois}, {num_cols}) float targets; got "
                f"{tuple(targets.shape)} {targets.dtype}"
            )
        if num_rois and bool(((targets < 0) | (targets >= num_cols)).any()):
            raise ValueError(
                f"EQL v2 labels must lie in [0, {num_cols - 1}] ({num_cols - 1} = background), "
                f"got min {int(targets.min())}, max {int(targets.max())}"
            )
        t = F.one_hot(targets.to(device=z.device, dtype=torch.long), num_cols).to(dtype)
    pos_w = pos_w.detach().to(device=z.device, dtype=dtype)
    neg_w = neg_w.detach().to(device=z.device, dtype=dtype)
    return z, t, pos_w, neg_w


def eqlv2_loss(
    logits: torch.Tensor, targets: torch.Tensor, pos_w: torch.Tensor, neg_w: torch.Tensor
) -> torch.Tensor:
    """EQL v2 training loss of the box classifier (spec §2.1).

    ``L = (1/R) sum_r sum_j W[r, j] * BCEWithLogits(z[r, j], T[r, j])`` over all C+1 columns,
    with ``W[r, j] = pos_w[j] * T[r, j] + neg_w[j] * (1 - T[r, j])``. The divisor is the number of
    RoIs R (fg + bg), not R * (C+1) and not the number of fg RoIs, as in the authors' code. W is a
    constant, so ``dL/dz = W * (sigmoid(z) - T) / R``. Multiply by a loss weight outside (1.0 in
    the authors' configs).

    Args:
        logits: (R, C+1) raw classifier logits z, background last (any float dtype; fp16/bf16
            are computed in float32).
        targets: either (R,) integer labels in [0, C] (C = background), turned into the one-hot
            T (a bg RoI has its 1 in column C, the background task); or an (R, C+1) float tensor
            T with entries in [0, 1], for soft targets such as PCB's (spec §2.3: the same W and G
            formulas then apply to the fractional T). Targets are constants: no gradient flows
            into them.
        pos_w: (C+1,) positive weights q (:attr:`EQLv2Weights.pos`; float64 is fine).
        neg_w: (C+1,) negative weights r (:attr:`EQLv2Weights.neg`).

    Returns:
        Scalar loss in float32 (float64 for float64 logits). For R = 0 it is a zero that is
        still connected to ``logits``, so backward gives zero gradients instead of NaN.

    Raises:
        ValueError: on a shape, dtype or range mismatch between logits, targets and weights.
    """
    z, t, pos_w, neg_w = _prepare(logits, targets, pos_w, neg_w)
    num_rois = z.shape[0]
    if num_rois == 0:
        return z.sum() * 0.0
    # r + (q - r) T is q on positives and r on negatives, and interpolates for soft targets.
    weight = neg_w + (pos_w - neg_w) * t
    # BCE(z, T) = (1 - T) softplus(z) + T softplus(-z) (= softplus(z) - T z): a sum of two
    # non-negative terms without cancellation. torch's fused BCE-with-logits evaluates the
    # negative term as log(1 + e^z) after rounding 1 + e^z, which in float32 costs ~1e-4 relative
    # on each small term, ~1e-5 on a 1204-column LVIS loss (spec §6 Ex C). Its gradient is the
    # same complementary form as in eqlv2_grad_increments.
    bce = (1.0 - t) * F.softplus(z) + t * F.softplus(-z)
    return (weight * bce).sum() / num_rois


def eqlv2_grad_increments(
    logits: torch.Tensor, targets: torch.Tensor, pos_w: torch.Tensor, neg_w: torch.Tensor
) -> EQLv2GradIncrements:
    """This call's increments of the EQL v2 statistics, computed analytically (spec §2.3).

    The authors collect ``|dBCE/dz|`` on the logits during the loss's forward pass; this is the
    same quantity in closed form, so no backward hook is needed and the increments can be
    all-reduced before the caller updates its buffers:

    - ``G[r, j] = |sigmoid(z[r, j]) - T[r, j]|`` on detached logits: the per-element BCE
      gradient magnitude, before the 1/R and any loss weight.
    - ``pos_j = sum_r G * W * T`` and ``neg_j = sum_r G * W * (1 - T)`` for j < C only (the
      background column is dropped). W is the weight of the loss (the same ``pos_w``/``neg_w``
      of this call), so the *re-weighted* magnitudes are accumulated, as in the reference.
      Because ``W >= 0``, ``G * W`` equals ``|dL/dz| * R``.

    Positives of class j come only from RoIs with target mass on j; every other RoI, background
    ones included, adds to the negatives. A background-only batch therefore changes only
    ``neg``. For ``sigmoid(z) - T`` the complementary form ``(1 - T) sigmoid(z) - T sigmoid(-z)``
    is used: it is exact for a saturated positive (large z, T = 1), where ``sigmoid(z) - 1``
    rounds to 0.

    Args:
        logits: (R, C+1) raw classifier logits (detached internally; any float dtype).
        targets: (R,) integer labels in [0, C] or (R, C+1) float targets, as in
            :func:`eqlv2_loss`.
        pos_w: (C+1,) positive weights q used by this call's loss.
        neg_w: (C+1,) negative weights r used by this call's loss.

    Returns:
        :class:`EQLv2GradIncrements` of two (C,) tensors, non-negative, without gradient, in
        float32 (float64 for float64 logits), on the logits' device. Zeros for R = 0 (the
        caller must still take part in the all-reduce).

    Raises:
        ValueError: on the same bad inputs as :func:`eqlv2_loss`.
    """
    with torch.no_grad():
        z, t, pos_w, neg_w = _prepare(logits.detach(), targets, pos_w, neg_w)
        magnitude = ((1.0 - t) * torch.sigmoid(z) - t * torch.sigmoid(-z)).abs()
        weighted = magnitude * (neg_w + (pos_w - neg_w) * t)
        pos = (weighted * t).sum(dim=0)[:-1]
        neg = (weighted * (1.0 - t)).sum(dim=0)[:-1]
        return EQLv2GradIncrements(pos, neg)


def eqlv2_probs(logits: torch.Tensor, test_with_obj: bool = True) -> torch.Tensor:
    """EQL v2 inference scores, background last (spec §2.4).

    With ``test_with_obj`` (the authors' default): column c < C is
    ``sigmoid(z_c) * (1 - sigmoid(z_C))``, the class score times the objectness probability, and
    column C is ``sigmoid(z_C)``, which Detectron2's ``fast_rcnn_inference`` drops. Rows do not sum
    to 1 (independent sigmoids). ``1 - sigmoid(z_C)`` is evaluated as ``sigmoid(-z_C)``, exact for
    confident foreground.

    With ``test_with_obj=False``: the raw ``sigmoid(z)`` in every column. Its first C columns are
    also what PCB's EQL v2 variant accumulates in its confusion matrix (element-wise sigmoids of
    the class logits, not re-normalised, no objectness factor; PCB spec §2.1).

    The gradient statistics are not used at test time.

    Args:
        logits: (R, C+1) raw classifier logits z.
        test_with_obj: multiply the class scores by the objectness probability.

    Returns:
        (R, C+1) scores in [0, 1], computed and returned in float32 for fp16/bf16 logits, otherwise
        in the logits' dtype.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(
            f"EQL v2 logits must be (R, C+1) with C >= 1 (background last), got {_shape(logits)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"EQL v2 logits must be a float tensor, got {logits.dtype}")
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    probs = torch.sigmoid(z)
    if not test_with_obj:
        return probs
    objectness = torch.sigmoid(-z[:, -1:])
    return torch.cat([probs[:, :-1] * objectness, probs[:, -1:]], dim=1)
