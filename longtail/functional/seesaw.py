"""Seesaw Loss: class counts, mitigation and compensation factors, training loss and scores.

Reference: Wang, Zhang, Zang, Cao, Pang, Gong, Chen, Liu, Loy & Lin, "Seesaw Loss for
Long-Tailed Instance Segmentation", CVPR 2021 (arXiv 2008.10032), eqs. 4-8; behaviour follows
MMDetection's ``mmdet/models/losses/seesaw_loss.py`` (the code, where it differs from the paper),
as described in the project's Seesaw spec.

Shape shorthand used below:
    R: number of sampled RoIs in the loss call (fg + bg, may be 0).
    C: number of foreground classes. Labels are in [0, C] with C = background, as in
       Detectron2's ``gt_classes``; the cumulative counts have C+1 entries, background last.

Logit layout (the same as mmdet, so converted checkpoints map one to one): the classifier has
**C+2 outputs** per RoI,

    ``z[:, :C]``   the C class logits (a C-way softmax, no background slot);
    ``z[:, C]``    the objectness "object" logit;
    ``z[:, C+1]``  the objectness "background" logit.

The class branch is trained on foreground RoIs only, with a softmax cross-entropy whose
non-target exponents are scaled by ``S_ij = M_ij * C_ij`` (M: mitigation from the cumulative
class counts, damping the penalty a frequent class i puts on a rarer class j; C: compensation
from the current predictions, restoring the penalty on a class j that the model already
over-predicts for a sample of class i). The objectness branch is a plain 2-way softmax
cross-entropy on all RoIs. At test time the score of class c is ``softmax(class)_c *
softmax(objectness)_object`` (:func:`seesaw_probs`).

One training step, in this order (the counts are the caller's buffer, all-reduced by it)::

    h = seesaw_count_increments(gt_classes, C)   # all_reduce(SUM) h across ranks, then
    counts += h                                  # *before* the loss: the batch counts itself
    losses = seesaw_loss(logits, gt_classes, counts)

This module holds no state and calls no collective.
"""

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

__all__ = [
    "SeesawLosses",
    "seesaw_count_increments",
    "seesaw_log_factors",
    "seesaw_loss",
    "seesaw_probs",
    "seesaw_class_probs",
]


class SeesawLosses(NamedTuple):
    """The two Seesaw loss terms, scalars in float32 (float64 for float64 logits).

    They are logged separately, as ``loss_cls_classes`` and ``loss_cls_objectness`` in mmdet,
    and summed (loss weight 1.0 each) for training.

    Attributes:
        classes: ``(1/R) sum_{fg RoIs} CE(z'_r, y_r)`` on the seesaw-adjusted class logits.
        objectness: ``(1/R) sum_{all RoIs} CE(z[r, C:C+2], 0 if fg else 1)``.
    """

    classes: torch.Tensor
    objectness: torch.Tensor


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def _check_labels(labels: torch.Tensor, num_classes: int, num_rois: Optional[int] = None) -> None:
    if (
        not isinstance(labels, torch.Tensor)
        or labels.dim() != 1
        or labels.is_floating_point()
        or labels.is_complex()
        or labels.dtype == torch.bool
        or (num_rois is not None and labels.shape[0] != num_rois)
    ):
        want = "(R,)" if num_rois is None else f"({num_rois},)"
        raise ValueError(
            f"Seesaw labels must be a {want} integer tensor with values in [0, {num_classes}] "
            f"({num_classes} = background), got {_shape(labels)}"
            + (f" {labels.dtype}" if isinstance(labels, torch.Tensor) else "")
        )
    if labels.numel() and bool(((labels < 0) | (labels > num_classes)).any()):
        raise ValueError(
            f"Seesaw labels must lie in [0, {num_classes}] ({num_classes} = background), got min "
            f"{int(labels.min())}, max {int(labels.max())}"
        )


def _check_logits(cls_logits: torch.Tensor) -> int:
    """Validates the (R, C+2) layout and returns C."""
    if (
        not isinstance(cls_logits, torch.Tensor)
        or cls_logits.dim() != 2
        or cls_logits.shape[1] < 3
        or not cls_logits.is_floating_point()
    ):
        raise ValueError(
            "Seesaw cls_logits must be a float (R, C+2) tensor with C >= 1: C class logits, then "
            f"the objectness [object, background] pair; got {_shape(cls_logits)}"
            + (f" {cls_logits.dtype}" if isinstance(cls_logits, torch.Tensor) else "")
        )
    return cls_logits.shape[1] - 2


def seesaw_count_increments(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Histogram of one loss call's labels, the increment of the cumulative counts (spec §2.1).

    The reference counts *sampled RoIs* (fg proposals including GT-as-proposal, and background at
    index C, which the factors never use) at the start of every loss call, so the current batch
    is included in its own factors. Add this (all-reduced across ranks for synchronised counts)
    to the caller's buffer *before* calling :func:`seesaw_loss`.

    Args:
        labels: (R,) integer labels in [0, num_classes]; may be empty.
        num_classes: C, the number of foreground classes (>= 1).

    Returns:
        (C+1,) int64 tensor on the labels' device: entry u is the number of RoIs with label u.
        Integers are exact; keep the cumulative buffer int64 or float64 (float32 stops counting
        exactly above 2^24 and fp16 overflows at 65504, spec §7).

    Raises:
        ValueError: if ``num_classes`` < 1, or ``labels`` is not a 1-D integer tensor in
            [0, num_classes].
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"Seesaw num_classes must be an int >= 1, got {num_classes!r}")
    _check_labels(labels, num_classes)
    return torch.bincount(labels.long(), minlength=num_classes + 1)


def _check_counts(cumulative_counts: torch.Tensor, num_classes: int) -> torch.Tensor:
    if not isinstance(cumulative_counts, torch.Tensor) or cumulative_counts.shape != (
        num_classes + 1,
    ):
        raise ValueError(
            f"Seesaw cumulative_counts must be a ({num_classes + 1},) tensor (C class counts, then "
            f"background) for C = {num_classes}, got {_shape(cumulative_counts)}"
        )
    counts = cumulative_counts.detach().to(torch.float64)
    if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        raise ValueError(
            "Seesaw cumulative_counts must be finite and >= 0; check that the buffer is not half "
            "precision (it overflows at 65504)"
        )
    return counts


def _check_hyper(p: float, q: float, eps: float) -> None:
    for name, value in (("p", p), ("q", q), ("eps", eps)):
        if not (math.isfinite(float(value)) and value >= 0):
            raise ValueError(f"Seesaw {name} must be finite and >= 0, got {value!r}")


def _log_factors(
    z_cls: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor, p: float, q: float, eps: float
) -> torch.Tensor:
    """log S for the rows of z_cls (all foreground, labels < C); (R_fg, C) in z_cls's dtype."""
    num_classes = z_cls.shape[1]
    labels = labels.to(device=z_cls.device, dtype=torch.long)
    # Mitigation, in log space and float64 (counts reach ~1e9): log M_ij = p * min(log N'_j -
    # log N'_i, 0) with N' = max(count, 1), the code's clamp (spec §2.2).
    log_n = counts[:num_classes].to(z_cls.device).clamp(min=1.0).log()
    log_m = p * (log_n.unsqueeze(0) - log_n[labels].unsqueeze(1)).clamp(max=0.0)
    # Compensation on the detached softmax of the *raw* class logits: log C_ij = q * max(log
    # sigma_j - log max(sigma_i, eps), 0) (spec §2.3). log_softmax never overflows, and with
    # eps = 0 (the paper's form) log eps = -inf is still well defined in the maximum.
    log_sigma = F.log_softmax(z_cls.detach(), dim=1)
    log_sigma_i = log_sigma.gather(1, labels.unsqueeze(1))
    log_floor = math.log(eps) if eps > 0 else -math.inf
    log_sigma_i = log_sigma_i.clamp(min=log_floor)
    log_c = q * (log_sigma - log_sigma_i).clamp(min=0.0)
    log_s = log_m.to(z_cls.dtype) + log_c
    # The target logit is never modified. Both factors are already exactly 1 on the diagonal;
    # masking makes that independent of rounding.
    return log_s.scatter(1, labels.unsqueeze(1), 0.0)


def seesaw_log_factors(
    cls_logits: torch.Tensor,
    labels: torch.Tensor,
    cumulative_counts: torch.Tensor,
    p: float = 0.8,
    q: float = 2.0,
    eps: float = 1e-2,
) -> torch.Tensor:
    """log S, the seesaw adjustment of the class logits, for every RoI (spec §2.2-2.4).

    For a foreground RoI of class i and a class j != i: ``log S_ij = log M_ij + log C_ij`` with

    - mitigation ``M_ij = (N'_j / N'_i)^p`` if ``N'_j < N'_i`` else 1, ``N' = max(count, 1)``;
    - compensation ``C_ij = (sigma_j / max(sigma_i, eps))^q`` if that ratio is > 1 else 1,
      ``sigma = softmax(z[:, :C])`` of the raw, detached class logits.

    ``log S_ii = 0`` (the target logit is never modified). Background rows, whose class branch is
    not trained, are all 0. :func:`seesaw_loss` adds this to the class logits; it is exposed for
    inspection and logging.

    Args:
        cls_logits: (R, C+2) raw logits in the module's layout.
        labels: (R,) integer labels in [0, C].
        cumulative_counts: (C+1,) counts *including* this call's labels (see
            :func:`seesaw_count_increments`); any real dtype, used in float64. Only the first C
            entries are used.
        p: mitigation exponent (code default 0.8); p = 0 turns mitigation off.
        q: compensation exponent (code default 2.0); q = 0 turns compensation off.
        eps: floor of sigma_i in the compensation (code default 1e-2); 0 gives the paper's eq. 8.

    Returns:
        (R, C) tensor without gradient, in float32 (float64 for float64 logits).

    Raises:
        ValueError: on a bad layout, labels, counts or hyperparameter.
    """
    num_classes = _check_logits(cls_logits)
    _check_labels(labels, num_classes, cls_logits.shape[0])
    counts = _check_counts(cumulative_counts, num_classes)
    _check_hyper(p, q, eps)
    with torch.no_grad():
        z_cls = cls_logits[:, :num_classes].to(torch.promote_types(cls_logits.dtype, torch.float32))
        labels = labels.to(z_cls.device)
        out = z_cls.new_zeros(z_cls.shape)
        fg = labels < num_classes
        out[fg] = _log_factors(z_cls[fg], labels[fg], counts, p, q, eps)
        return out


def seesaw_loss(
    cls_logits: torch.Tensor,
    labels: torch.Tensor,
    cumulative_counts: torch.Tensor,
    p: float = 0.8,
    q: float = 2.0,
    eps: float = 1e-2,
    class_targets: Optional[torch.Tensor] = None,
) -> SeesawLosses:
    """Seesaw training loss of the box classifier: class term and objectness term (spec §2.5).

    - ``classes = (1/R) sum_{fg r} CE(z'_r, y_r)`` with ``z'_r = z[r, :C] + log S_r``
      (:func:`seesaw_log_factors`), i.e. per RoI ``-log(e^{z_i} / (e^{z_i} + sum_{j != i} S_ij
      e^{z_j}))`` (paper eq. 4). S carries no gradient. The sum runs over the foreground RoIs
      but is **divided by all R RoIs** (mmdet's avg_factor), not by the number of fg RoIs.
    - ``objectness = (1/R) sum_r CE(z[r, C:C+2], o_r)`` with ``o_r = 0`` (object) for fg RoIs and
      1 (background) for bg RoIs.

    With p = q = 0 the class term is plain softmax CE over the C classes, summed over fg / R.

    Args:
        cls_logits: (R, C+2) raw logits: C class logits, then [object, background] (see module
            docstring). Any float dtype; fp16/bf16 are computed in float32.
        labels: (R,) integer labels in [0, C], C = background.
        cumulative_counts: (C+1,) cumulative class counts that **already include this call's
            labels** (the reference updates them first; see :func:`seesaw_count_increments`).
            Any real dtype (int64 or float64 buffers); only the C class entries are used.
        p, q, eps: see :func:`seesaw_log_factors` (code defaults 0.8, 2.0, 1e-2).
        class_targets: optional (R, C) soft targets over the C classes (e.g. PCB's mixed label),
            used in place of the one-hot label in the class CE: ``-sum_j t_j log softmax(z')_j``.
            The seesaw factors still come from the hard ``labels`` (PCB spec §2.3). Rows of
            background RoIs are ignored. No gradient flows into them.

    Returns:
        :class:`SeesawLosses` of two scalars in float32 (float64 for float64 logits). With no
        foreground RoI the class term is a zero still connected to ``cls_logits``; with R = 0
        both are, so backward gives zero gradients instead of NaN.

    Raises:
        ValueError: on a bad layout, labels, counts, targets or hyperparameter.
    """
    num_classes = _check_logits(cls_logits)
    num_rois = cls_logits.shape[0]
    _check_labels(labels, num_classes, num_rois)
    counts = _check_counts(cumulative_counts, num_classes)
    _check_hyper(p, q, eps)
    if class_targets is not None and (
        not isinstance(class_targets, torch.Tensor)
        or class_targets.shape != (num_rois, num_classes)
        or not class_targets.is_floating_point()
    ):
        raise ValueError(
            f"Seesaw class_targets must be a float ({num_rois}, {num_classes}) tensor (one row per "
            f"RoI over the C classes, no background column), got {_shape(class_targets)}"
        )

    # Upcast: fp16 softmax over ~1200 classes, plus log S up to ~q * log(1/eps), loses too much.
    z = cls_logits.to(torch.promote_types(cls_logits.dtype, torch.float32))
    labels = labels.to(device=z.device, dtype=torch.long)
    if num_rois == 0:
        zero = z.sum() * 0.0
        return SeesawLosses(zero, zero.clone())

    fg = labels < num_classes
    z_obj = z[:, num_classes:]
    objectness = F.cross_entropy(z_obj, (~fg).long(), reduction="sum") / num_rois

    z_cls = z[fg, :num_classes]
    if z_cls.shape[0] == 0:
        # Keeps the graph (and DDP's view of the parameters) intact with zero gradients.
        return SeesawLosses(z[:, :num_classes].sum() * 0.0, objectness)
    fg_labels = labels[fg]
    with torch.no_grad():
        log_s = _log_factors(z_cls, fg_labels, counts, p, q, eps)
    adjusted = z_cls + log_s
    if class_targets is None:
        class_sum = F.cross_entropy(adjusted, fg_labels, reduction="sum")
    else:
        targets = class_targets.detach()[fg.to(class_targets.device)].to(
            device=z.device, dtype=z.dtype
        )
        class_sum = -(targets * F.log_softmax(adjusted, dim=1)).sum()
    return SeesawLosses(class_sum / num_rois, objectness)


def seesaw_class_probs(cls_logits: torch.Tensor) -> torch.Tensor:
    """``softmax(z[:, :C])``: the class branch alone, from the raw class logits.

    This is the distribution the compensation factor reads, and the one PCB's Seesaw variant
    accumulates in its confusion matrix (raw class logits, before the seesaw adjustment, no
    objectness; PCB spec §2.1).

    Args:
        cls_logits: (R, C+2) raw logits in the module's layout.

    Returns:
        (R, C) probabilities, rows summing to 1, in float32 for fp16/bf16 logits, otherwise in
        the logits' dtype.
    """
    num_classes = _check_logits(cls_logits)
    z = cls_logits.to(torch.promote_types(cls_logits.dtype, torch.float32))
    return F.softmax(z[:, :num_classes], dim=1)


def seesaw_probs(cls_logits: torch.Tensor) -> torch.Tensor:
    """Seesaw inference scores in Detectron2's layout, background last (spec §1, §2.7).

    Column c < C is ``softmax(z[:, :C])_c * softmax(z[:, C:C+2])_0`` (class probability times the
    objectness "object" probability) and column C is ``softmax(z[:, C:C+2])_1``. Rows sum to 1,
    so Detectron2's ``fast_rcnn_inference`` can drop column C as for a softmax classifier and
    cascade heads can average these probabilities. The counts are not used at test time.

    Args:
        cls_logits: (R, C+2) raw logits in the module's layout.

    Returns:
        (R, C+1) probabilities in float32 for fp16/bf16 logits, otherwise in the logits' dtype.
    """
    num_classes = _check_logits(cls_logits)
    z = cls_logits.to(torch.promote_types(cls_logits.dtype, torch.float32))
    objectness = F.softmax(z[:, num_classes:], dim=1)
    class_probs = F.softmax(z[:, :num_classes], dim=1)
    return torch.cat([class_probs * objectness[:, :1], objectness[:, 1:]], dim=1)
