"""Effective Class-Margin (ECM) loss: margins, training loss and inference scores.

Reference: Cho & Krähenbühl, "Long-tail Detection with Effective Class-Margins", ECCV 2022
(arXiv 2301.09724), eqs. 8-11 and App. F; behaviour follows the authors' released code, as
described in the project's ECM spec.

Shape shorthand used below:
    B: number of sampled RoIs in the batch (may be 0).
    C: number of foreground classes. Every per-class vector and every logit row has C+1
       entries; the last one (index C) is the background channel, as in Detectron2's
       ``gt_classes`` convention.

ECM replaces the box classifier's softmax with C+1 independent binary terms. Channel c sees
``n_c^+`` positives and ``n_c^-`` negatives; its margins turn the logit z into the score
``sigmoid(2 z + delta_c)`` during training, and the term is weighted by ``m_c``. At inference the
margins are dropped (see :func:`ecm_probs`).
"""

import math
from typing import NamedTuple, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = ["ECMMargins", "ecm_margins", "ecm_loss", "ecm_probs"]


class ECMMargins(NamedTuple):
    """Per-channel ECM statistics; each field is a (C+1,) float64 tensor (background last).

    Attributes:
        gamma_pos: positive margin gamma^+ = (n^-)^{1/4} / ((n^+)^{1/4} + (n^-)^{1/4}), in (0, 1).
        gamma_neg: negative margin gamma^- = 1 - gamma^+, in (0, 1).
        delta: logit offset log w^+ - log w^- (w^± = 1 / gamma^±) = 1/4 log(n^+ / n^-).
        weight: loss weight m = alpha log(1 + 1/alpha), alpha = n^- / n^+, in (0, 1).
    """

    gamma_pos: torch.Tensor
    gamma_neg: torch.Tensor
    delta: torch.Tensor
    weight: torch.Tensor


def ecm_margins(class_counts: Union[torch.Tensor, Sequence[float]], bg_ratio: float) -> ECMMargins:
    """Closed-form ECM margins and weights from the training-set class counts.

    The background channel gets the pseudo-count ``n_bg = bg_ratio * sum(class_counts)``. With
    ``N`` the sum of all C+1 counts, channel c has ``n^+ = n_c`` positives and ``n^- = N - n_c``
    negatives: a class's negatives are all other classes plus background, and background's
    negatives are all foreground instances.

    Zero counts (a class absent from the training split) are clamped to 1, the smallest LVIS
    count, before anything else, so ``n_bg`` uses the clamped counts too. Without the clamp
    gamma^- would be 0, log w^- infinite and m NaN.

    Args:
        class_counts: (C,) non-negative number of training *instances* (annotations) per
            foreground class, in contiguous class order. Not image counts, not RFS-rescaled.
        bg_ratio: r, the number of background RoIs per foreground RoI among the box head's
            sampled RoIs (6.3313 in the authors' configs). Must be finite and > 0.

    Returns:
        ECMMargins of four (C+1,) float64 tensors, all finite.

    Raises:
        ValueError: if ``bg_ratio`` is not finite and > 0, or ``class_counts`` is not a non-empty
            1-D vector of finite, non-negative numbers, or the counts are so large that the
            statistics overflow float64.
    """
    r = float(bg_ratio)
    if not (math.isfinite(r) and r > 0):
        raise ValueError(f"ECM bg_ratio must be finite and > 0, got {bg_ratio!r}")
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(
            f"ECM class_counts must be a non-empty 1-D (C,) vector, got shape {tuple(counts.shape)}"
        )
    if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        raise ValueError("ECM class_counts must be finite and non-negative")

    n_fg = counts.clamp(min=1.0)
    fg_total = n_fg.sum()
    n_bg = r * fg_total
    n_pos = torch.cat([n_fg, n_bg.reshape(1)])
    # n^- = N - n^+, written per channel type so that no large count is subtracted from N
    # (with a huge r, N - n_bg would cancel catastrophically).
    n_neg = torch.cat([(fg_total - n_fg) + n_bg, fg_total.reshape(1)])

    # The fourth root (paper eq. 8) is the optimal margin exponent; it is easy to get wrong.
    root_pos, root_neg = n_pos.pow(0.25), n_neg.pow(0.25)
    gamma_pos = root_neg / (root_pos + root_neg)
    gamma_neg = root_pos / (root_pos + root_neg)
    # log w^+ - log w^- = log(gamma^- / gamma^+); from the counts directly it stays accurate even
    # when one margin is tiny.
    delta = 0.25 * (n_pos.log() - n_neg.log())
    # The code's choice: the lower end of the paper's range for m (Thm 2). log1p keeps it exact
    # for rare classes, where 1/alpha ~ 1e-7.
    alpha = n_neg / n_pos
    weight = alpha * torch.log1p(1.0 / alpha)

    margins = ECMMargins(gamma_pos, gamma_neg, delta, weight)
    if not all(bool(torch.isfinite(t).all()) for t in margins):
        raise ValueError("ECM statistics are not finite: class_counts overflow float64")
    return margins


def ecm_loss(
    logits: torch.Tensor, gt_classes: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """ECM training loss of the box classifier.

    ``L = (1/B) * sum_i sum_c m_c * BCEWithLogits(2 z_ic + delta_c, y_ic)``, with y the one-hot of
    ``gt_classes`` over C+1 channels. The paper's surrogate score
    ``w^+ e^z / (w^+ e^z + w^- e^-z)`` equals ``sigmoid(2 z + delta)``; evaluating the BCE on
    that logit avoids the overflow of the exp/exp/log form.

    Args:
        logits: (B, C+1) raw classifier logits z (any float dtype; fp16/bf16 are computed in
            float32).
        gt_classes: (B,) int64 labels in [0, C]; C is background.
        delta: (C+1,) logit offsets (``ECMMargins.delta``; float64 buffers are fine).
        weight: (C+1,) loss weights m (``ECMMargins.weight``).

    Returns:
        Scalar loss in float32 (float64 for float64 logits). For B = 0 it is a zero that is
        still connected to ``logits``, so backward gives zero gradients instead of NaN.
    """
    if logits.dim() != 2 or delta.shape != (logits.shape[1],) or weight.shape != delta.shape:
        raise ValueError(
            f"ECM loss expects (B, C+1) logits with (C+1,) delta and weight, got "
            f"{tuple(logits.shape)}, {tuple(delta.shape)}, {tuple(weight.shape)}"
        )
    if gt_classes.shape != (logits.shape[0],):
        raise ValueError(
            f"ECM gt_classes must be ({logits.shape[0]},), got {tuple(gt_classes.shape)}"
        )
    # Half-precision logits are upcast: 2z + delta and the sum over C+1 channels lose too much
    # in fp16/bf16 (spec §8).
    dtype = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(dtype)
    num_rois = z.shape[0]
    if num_rois == 0:
        return z.sum() * 0.0

    delta = delta.to(device=z.device, dtype=dtype)
    weight = weight.to(device=z.device, dtype=dtype)
    targets = F.one_hot(gt_classes.long(), num_classes=z.shape[1]).to(dtype)
    # (1, C+1) weight broadcasts over the B rows; a sum over all channels, then a mean over RoIs
    # (no 1/C, no avg_factor), as in the authors' code.
    loss = F.binary_cross_entropy_with_logits(
        2.0 * z + delta, targets, weight=weight.expand_as(z), reduction="sum"
    )
    return loss / num_rois


def ecm_probs(logits: torch.Tensor) -> torch.Tensor:
    """ECM inference scores: plain sigmoids with foreground calibration, no margins.

    Args:
        logits: (B, C+1) raw classifier logits z.

    Returns:
        (B, C+1) scores: column c < C is ``sigmoid(z_c) * (1 - sigmoid(z_bg))`` and column C is
        ``sigmoid(z_bg)``. Training's factor 2 and delta are deliberately absent: the 1e-4 score
        threshold and top-k cut act on these calibrated plain sigmoids.
    """
    probs = logits.sigmoid()
    p_bg = probs[:, -1:]
    return torch.cat([probs[:, :-1] * (1.0 - p_bg), p_bg], dim=1)
