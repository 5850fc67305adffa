"""IIF, Inverse Image Frequency: per-class logit weights, training loss and inference scores.

Reference: Alexandridis, Luo, Nguyen, Deng & Zafeiriou, "Inverse Image Frequency for Long-tailed
Image Recognition", IEEE TIP 2023, eqs. 10-16 and Table III; behaviour follows the authors'
released code (kostas1515/iif, mmdet 2.15.1), as described in the project's IIF spec.

Shape shorthand used below:
    B: number of sampled RoIs in the batch (may be 0).
    C: number of foreground classes. Every per-class vector and every logit row has C+1
       entries; the last one (index C) is the background channel, as in Detectron2's
       ``gt_classes`` convention (the authors' mmdet code also puts it last; the paper's
       notation puts it at 0).

IIF multiplies the box classifier's logits by a fixed, dataset-derived weight per class,
``z'_c = w_c * z_c``, with w_c large for rare classes (w_c is a link function of
``p_c = f_c / K``, e.g. ``-ln p_c``). The background weight is exactly 1. The *same* weighted
logits feed a plain softmax cross-entropy during training and a softmax over all C+1 entries at
inference. Because every weight is > 0 the weighting never changes a logit's sign, unlike
additive logit adjustment, which can push a background RoI's negative logits above the score
threshold.
"""

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = ["IIF_VARIANTS", "iif_weights", "iif_logits", "iif_loss", "iif_probs"]

#: Weight functions of paper Table III / spec §2, by the names used in the authors' configs and
#: CSV columns (their LVIS CSV calls ``relative`` "prob" and their classification code "rel";
#: their ``<name>_obj`` columns are the same formulas on instance counts, i.e. IOF). With
#: ``p = f / K``:
#:
#: - ``raw``: ``ln(K / f)``, in (0, inf).
#: - ``smooth``: ``ln((K + 1) / (f + 1)) + 1``, in [1, inf); finite for f = 0.
#: - ``relative``: ``ln((K - f) / f)``, the logit of 1 - p; > 0 iff p < 0.5.
#: - ``base2``: ``log2(K / f) = raw / ln 2``.
#: - ``base10``: ``log10(K / f) = raw / ln 10`` (the final LVIS model, on instance counts).
#: - ``gombit``: ``-ln(-ln(1 - p))``; > 0 iff p < 1 - 1/e.
#: - ``normit``: ``-Phi^{-1}(p) = Phi^{-1}(1 - p)``; > 0 iff p < 0.5. The paper prints
#:   ``Phi^{-1}(K / f)``, which is undefined (K / f > 1); this is what the authors' code uses.
IIF_VARIANTS = ("raw", "smooth", "relative", "base2", "base10", "gombit", "normit")


def _variant_error(variant) -> ValueError:
    return ValueError(f"Unknown IIF variant {variant!r}; expected one of {list(IIF_VARIANTS)}")


def iif_weights(
    class_counts: Union[torch.Tensor, Sequence[float]],
    num_images: Optional[float],
    variant: str,
    *,
    allow_nonpositive: bool = False,
) -> torch.Tensor:
    """IIF / IOF weight vector from the training-set class counts, background last.

    Which count makes the method (the caller chooses, this function cannot tell them apart):

    - **IIF** (image level): ``class_counts[c]`` = number of training images that contain at
      least one instance of c (LVIS ``image_count``), with ``num_images`` = number of training
      images (LVIS v1: 100,170). This K is the authors' code (their CSVs match it to 1e-12);
      the paper's eq. 11 says ``K = sum_c IF_c`` (LVIS v1: 360,952), which shifts every raw
      weight by ``ln(360952 / 100170) ~ 1.28`` and does not reproduce their numbers. Pass
      ``num_images=None`` for the paper's K.
    - **IOF** (instance level, the "_obj" variants, e.g. the final LVIS model's base-10 IOF):
      ``class_counts[c]`` = number of training instances of c (LVIS ``instance_count``) with
      ``num_images=None``, so that K = total number of instances (LVIS v1: 1,270,141), as in
      the authors' code. Passing the number of images with instance counts is *not* IOF.

    Zero counts (a class absent from the training split; never the case on full LVIS): the
    spec's remedy is either ``smooth``, which is finite at f = 0 (``ln(K + 1) + 1``) and is
    therefore computed from the unclamped count, or clamping f >= 1, which every other variant
    does, so an absent class gets the weight of a class seen once.

    Args:
        class_counts: (C,) finite, non-negative counts per foreground class, in contiguous class
            order (sorted dataset category id), not indexed by dataset category id.
        num_images: the normaliser K, finite and >= 1: the number of training images for image
            counts. ``None`` means ``K = sum(class_counts)`` (IOF, or the paper's eq. 11).
            Every count must be <= K, since ``p = f / K`` is a frequency.
        variant: one of :data:`IIF_VARIANTS` (lower-case).
        allow_nonpositive: ``relative``/``normit`` (p >= 0.5), ``gombit`` (p >= 1 - 1/e) and
            ``raw``/``base2``/``base10`` (p = 1) give weights <= 0, which flip or zero the
            logits and break IIF's sign-preservation (spec §7, e.g. COCO "person" under
            ``relative``). By default that raises; set True to get the values anyway.

    Returns:
        (C+1,) float64 tensor: the C foreground weights followed by the background weight 1.0.
        All entries are finite (and > 0 unless ``allow_nonpositive``).

    Raises:
        ValueError: if ``variant`` is unknown, ``class_counts`` is not a non-empty 1-D vector of
            finite non-negative numbers, K is not finite and >= 1, a count exceeds K, or a
            weight is not finite or (by default) not > 0.
    """
    if not isinstance(variant, str) or variant not in IIF_VARIANTS:
        raise _variant_error(variant)
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(
            f"IIF class_counts must be a non-empty 1-D (C,) vector, got shape {tuple(counts.shape)}"
        )
    if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        raise ValueError("IIF class_counts must be finite and non-negative")

    if num_images is None:
        k = float(counts.sum())
        k_name = "sum(class_counts)"
    else:
        k = float(num_images)
        k_name = "num_images"
    if not (math.isfinite(k) and k >= 1.0):
        raise ValueError(f"IIF normaliser K = {k_name} must be finite and >= 1, got {k!r}")
    if bool((counts > k).any()):
        raise ValueError(
            f"IIF class_counts must not exceed K = {k_name} = {k:g} (largest count "
            f"{float(counts.max()):g}); for instance counts (IOF) pass num_images=None so that "
            "K is the total number of instances"
        )

    if variant == "smooth":
        w = math.log1p(k) - torch.log1p(counts) + 1.0
    else:
        # log(0) = -inf would make every other link infinite: clamp (spec §7). K >= 1 keeps f <= K.
        f = counts.clamp(min=1.0)
        raw = math.log(k) - f.log()
        if variant == "raw":
            w = raw
        elif variant == "base2":
            w = raw / math.log(2.0)
        elif variant == "base10":
            w = raw / math.log(10.0)
        elif variant == "relative":
            # ln(K - f) - ln f instead of ln((1 - p) / p): exact in the counts.
            w = (k - f).log() - f.log()
        elif variant == "gombit":
            # log1p keeps -ln(1 - p) accurate for the tiny p of rare classes (p ~ 1e-5 on LVIS).
            w = -torch.log(-torch.log1p(-f / k))
        else:  # normit
            # -Phi^{-1}(p) rather than Phi^{-1}(1 - p): 1 - p rounds away the rare classes' p.
            w = -torch.special.ndtri(f / k)

    if not bool(torch.isfinite(w).all()):
        raise ValueError(
            f"IIF {variant!r} weights are not finite: a class count equals K = {k_name} = {k:g} "
            "(p = 1); use 'raw' or 'smooth', or check the counts"
        )
    if not allow_nonpositive and bool((w <= 0).any()):
        worst = int(w.argmin())
        raise ValueError(
            f"IIF {variant!r} weight of class {worst} is {float(w[worst]):.4g} <= 0 (count "
            f"{float(counts[worst]):g} of K = {k:g}); it would flip or zero that class's logits. "
            "Use 'raw' or 'smooth' (or another K), or pass allow_nonpositive=True"
        )
    return torch.cat([w, w.new_ones(1)])


def _check_logits_and_weights(logits: torch.Tensor, weights: torch.Tensor) -> None:
    if logits.dim() != 2 or weights.shape != (logits.shape[1],):
        raise ValueError(
            f"IIF expects (B, C+1) logits and (C+1,) weights, got {tuple(logits.shape)} and "
            f"{tuple(weights.shape)}"
        )


def iif_logits(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted logits ``w * z``, column c scaled by ``weights[c]`` (paper eq. 13).

    This is the only thing IIF changes: the training loss (:func:`iif_loss`) and the inference
    scores (:func:`iif_probs`) are a plain softmax over these C+1 values, never sigmoids. There
    is no extra temperature: the weights act as per-class softmax bases (``q_c`` proportional to
    ``(1 / p_c) ** z_c`` for ``raw``). A cosine classifier's scale (T = 8 in the authors' IIF
    configs) belongs to the classifier that produced ``logits``, not to this weighting. With
    positive weights ``sign(w * z) == sign(z)`` elementwise; the background column (weight 1)
    is unchanged.

    Args:
        logits: (B, C+1) raw classifier logits z, background last.
        weights: (C+1,) weights from :func:`iif_weights`; cast to the logits' dtype and device.

    Returns:
        (B, C+1) tensor in the logits' dtype.
    """
    _check_logits_and_weights(logits, weights)
    return logits * weights.to(device=logits.device, dtype=logits.dtype)


def iif_loss(logits: torch.Tensor, gt_classes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """IIF training loss: softmax cross-entropy on the weighted logits (paper eq. 15).

    ``L = (1/B) sum_i -log softmax(w * z_i)[y_i]``, y_i may be the background C. The gradient
    w.r.t. z is ``w * (q - onehot(y))`` (eq. 16). A plain mean over RoIs, as the authors' code
    (label weights 1, avg_factor = number of sampled RoIs); no sigmoid, federated or EQL term.

    Args:
        logits: (B, C+1) raw classifier logits z (any float dtype; fp16/bf16 are computed in
            float32, since weighted logits of up to ~20x their size are fed to the softmax).
        gt_classes: (B,) int64 labels in [0, C]; C is background.
        weights: (C+1,) weights from :func:`iif_weights` (float64 buffers are fine).

    Returns:
        Scalar loss in float32 (float64 for float64 logits). For B = 0 it is a zero that is
        still connected to ``logits``, so backward gives zero gradients instead of NaN.
    """
    _check_logits_and_weights(logits, weights)
    if gt_classes.shape != (logits.shape[0],):
        raise ValueError(
            f"IIF gt_classes must be ({logits.shape[0]},), got {tuple(gt_classes.shape)}"
        )
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if z.shape[0] == 0:
        # F.cross_entropy's mean over zero rows is 0/0 = NaN.
        return z.sum() * 0.0
    # Fused log-softmax + NLL on w * z; exp followed by log would overflow for rare classes.
    return F.cross_entropy(iif_logits(z, weights), gt_classes.long(), reduction="mean")


def iif_probs(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """IIF inference scores: ``softmax(w * z)`` over all C+1 columns, background last.

    The authors apply the same weights at test time as in training (end-to-end IIF); the
    caller then drops the background column before the score threshold, NMS and top-k, as
    Detectron2's ``fast_rcnn_inference`` does.

    Args:
        logits: (B, C+1) raw classifier logits z.
        weights: (C+1,) weights from :func:`iif_weights`.

    Returns:
        (B, C+1) probabilities, rows summing to 1, computed and returned in float32 for
        fp16/bf16 logits (as under autocast), otherwise in the logits' dtype.
    """
    _check_logits_and_weights(logits, weights)
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.softmax(iif_logits(z, weights), dim=1)
