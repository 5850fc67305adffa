"""LDA, Long-tailed Distribution Adaptation: risks, adaptive factor, divergence proxy and scores.

Reference: Peng, Huang, Guo, Zhang, Jiao & Ye, "Long-tailed Distribution Adaptation", ACM MM
2021, eqs. 5-10 and Supp. B. The classification behaviour follows the authors' released code
(pengzhiliang/LDA, classification only); the detection version is the project's reading of
Supp. B. Both are described in the project's LDA spec, whose section numbers (§2.x, §7, §8) are
cited below.

Shape shorthand used below:
    N: number of samples the LDA terms see. In detection these are the *positive* RoIs P of the
       per-GPU batch (may be 0).
    R: number of sampled RoIs, positives and negatives (may be 0).
    C: number of foreground classes. The logits of the heads h' and h have C columns and no
       background column. Labels are contiguous class indices in [0, C).
    D: width of the projected features F = p(z) (128 in the authors' code).

The box classifier is split into four linear heads on one shared feature z: g (fg/bg, 2
columns, foreground first), h' (plain CE on P, :func:`unbalanced_risk`), h (inverse-frequency
weighted CE on P, :func:`balanced_risk`) and p (projection for :func:`intra_class_compactness` and
:func:`inter_class_separation`). The weighted term is scaled by a constant alpha
(:func:`adaptive_alpha`) driven by the recent training-accuracy gap between h' and h. At test time
only g and h are used (:func:`lda_probs`).

This module is stateless. The caller (the predictor) owns the class-count buffer, the two accuracy
ring buffers and the step counter, and it all-reduces the per-iteration counts of
:func:`top1_correct` so that alpha is the same on every rank (spec §3).

Precision: every loss and score is computed in float32 (float64 for float64 inputs), also under
fp16/bf16 inputs. The smallest LVIS class weight 1/(C n_c) is about 1.6e-8, which is 0 in fp16
(spec §8), and the cosines of the divergence terms lose too much in half precision.
"""

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = [
    "BALANCED_NORMS",
    "UNBALANCED_NORMS",
    "INTER_WEIGHTINGS",
    "lda_class_weights",
    "unbalanced_risk",
    "balanced_risk",
    "top1_correct",
    "top1_accuracy_percent",
    "accuracy_gap",
    "adaptive_alpha",
    "auto_ring_length",
    "intra_class_compactness",
    "inter_class_separation",
    "fgbg_loss",
    "lda_probs",
]

#: Reductions of the balanced risk eps_b (spec §2.2); ``w_c = 1 / (C n_c)``, N = batch size and
#: ``N_tot = sum_c n_c``:
#:
#: - ``code``: ``sum_i w_{y_i} l_i``, the authors' code: a SUM over the batch, so its scale is
#:   ``N / N_tot`` times the class-balanced mean CE (tiny on LVIS; the project default).
#: - ``mean``: ``(1/N) sum_i w~_{y_i} l_i`` with ``w~_c = N_tot / (C n_c)``, whose mean under the
#:   training distribution is 1; equals ``code * N_tot / N``.
#: - ``self_norm``: ``sum_i w_{y_i} l_i / sum_i w_{y_i}``, a weighted mean over the batch that does
#:   not depend on N or N_tot.
BALANCED_NORMS = ("code", "mean", "self_norm")

#: Reductions of the unbalanced risk eps_u over the positive RoIs (detection only, project choice):
#:
#: - ``positives``: the mean CE over the N positives, the paper's eps_u (spec §2.1, §2.6).
#: - ``sampled``: the summed CE over the positives divided by the R sampled RoIs, as detectron2's
#:   CE does; per positive RoI the gradient is N / R of ``positives``'s.
UNBALANCED_NORMS = ("positives", "sampled")

#: Weightings of the inter-class hinge terms H_ij over ordered pairs i != j of classes present in
#: the batch (spec §2.4), with the class weights w of :func:`lda_class_weights`:
#:
#: - ``none``: the plain mean of H_ij over the C_b (C_b - 1) ordered pairs, the code's default
#:   (``WEIGHT_INTER_LOSS=False``) and the project default.
#: - ``code``: ``sum_ij w^_ij H_ij`` with ``w^_ij = (w_i + w_j) / sum_kl (w_k + w_l)``, the code's
#:   weighted option (a weighted mean, still in [0, margin]).
#: - ``paper``: ``sum_ij (w_i + w_j) H_ij``, paper eq. 8: an un-normalised sum.
INTER_WEIGHTINGS = ("none", "code", "paper")

# Norm floor in every cosine (F.cosine_similarity's default eps): a zero feature or a zero class
# center (e.g. features (1, 0) and (-1, 0) of one class) gives cosine 0, not 0/0 = NaN.
_COS_EPS = 1e-8


# ---------------------------------------------------------------- input checks


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # fp16/bf16 -> float32, float32 -> float32, float64 -> float64.
    return torch.promote_types(t.dtype, torch.float32)


def _as_float(x) -> float:
    # NaN for anything that is not a real number, so the caller's finiteness check reports it.
    if isinstance(x, (bool, str, bytes)):
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def _check_labels(labels: torch.Tensor, n: int, what: str) -> None:
    if not isinstance(labels, torch.Tensor) or labels.shape != (n,) or not _is_integer(labels):
        got = (
            f"{tuple(labels.shape)} {labels.dtype}"
            if isinstance(labels, torch.Tensor)
            else type(labels).__name__
        )
        raise ValueError(
            f"LDA labels must be an integer tensor of shape ({n},) for {what}, got {got}"
        )


def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    """(N, C) floating logits with C >= 1 and (N,) integer labels in [0, C)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] < 1:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"LDA {what} expects (N, C) logits with C >= 1, got {got}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"LDA {what} expects floating-point logits, got {logits.dtype}")
    _check_labels(labels, logits.shape[0], what)
    # One host sync; an out-of-range label would otherwise be a CUDA device-side assert in
    # F.cross_entropy or a silent wrong gather of its class weight.
    if labels.numel() > 0 and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise ValueError(
            f"LDA {what}: labels must lie in [0, C) = [0, {logits.shape[1]}), got range "
            f"[{int(labels.min())}, {int(labels.max())}]; background RoIs must be filtered out "
            "before the LDA terms"
        )


def _check_features_labels(features: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        got = (
            tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        )
        raise ValueError(f"LDA {what} expects (N, D) projected features, got {got}")
    if not features.dtype.is_floating_point:
        raise ValueError(f"LDA {what} expects floating-point features, got {features.dtype}")
    _check_labels(labels, features.shape[0], what)


def _clamped_counts(class_counts: Union[torch.Tensor, Sequence[float]]) -> torch.Tensor:
    """Validated (C,) float64 counts, clamped to >= 1."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(
            f"LDA class_counts must be a non-empty 1-D (C,) vector, got shape {tuple(counts.shape)}"
        )
    if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        raise ValueError("LDA class_counts must be finite and non-negative")
    # A class absent from the training split (n_c = 0) would get an infinite weight; clamping
    # gives it the weight of a class seen once, the largest finite one (never hit on full LVIS,
    # whose smallest instance count is 1).
    return counts.clamp(min=1.0)


# ---------------------------------------------------------------- empirical risks


def lda_class_weights(class_counts: Union[torch.Tensor, Sequence[float]]) -> torch.Tensor:
    """Label-shift importance weights ``w_c = 1 / (C n_c)`` of the authors' code (spec §2.2).

    They satisfy ``sum_c n_c w_c = 1``: over the whole training set the weighted loss is the
    class-balanced mean, each class contributing 1/C. The paper's ``w_c = 1 / p_u(c) = N_tot / n_c``
    is the same vector times ``C N_tot``; which scale is used matters together with the reduction
    (see :data:`BALANCED_NORMS` and spec §8).

    Args:
        class_counts: (C,) finite, non-negative *raw* training counts per class (LVIS
            ``instance_count`` by default, never counts after repeat-factor sampling), in
            contiguous class order. Zero counts are clamped to 1, so a class absent from the
            training split gets the (finite) weight of a class seen once instead of infinity;
            ``sum_c n_c w_c = 1`` then holds for the clamped counts.

    Returns:
        (C,) float64 tensor of weights, all finite and > 0, on the device of ``class_counts``.

    Raises:
        ValueError: if ``class_counts`` is not a non-empty 1-D vector of finite non-negative
            numbers.
    """
    counts = _clamped_counts(class_counts)
    return 1.0 / (counts.numel() * counts)


def unbalanced_risk(
    logits: torch.Tensor, labels: torch.Tensor, num_sampled: Optional[int] = None
) -> torch.Tensor:
    """Unbalanced empirical risk eps_u: plain mean softmax cross-entropy (spec §2.1).

    Applied to the logits of h' on the N positive samples; h' is what lets h specialise on the
    balanced risk without the representation forgetting the head classes.

    Args:
        logits: (N, C) logits of h' (any float dtype; fp16/bf16 are computed in float32).
        labels: (N,) integer labels in [0, C).
        num_sampled: None for the paper's mean over the N samples. An integer R >= N divides the
            summed CE by R instead: the detection convention (detectron2's CE averages over all
            R sampled RoIs, positives and negatives), under which each positive RoI pushes the
            shared box head as hard as under plain CE, not R / N times harder.

    Returns:
        Scalar in float32 (float64 for float64 logits). For N = 0 a zero still connected to
        ``logits``, so backward gives zero gradients instead of NaN.

    Raises:
        ValueError: on a shape or dtype mismatch, labels outside [0, C) or ``num_sampled < N``.
    """
    _check_logits_labels(logits, labels, "unbalanced_risk")
    if num_sampled is not None and (
        isinstance(num_sampled, bool)
        or not isinstance(num_sampled, int)
        or num_sampled < logits.shape[0]
    ):
        raise ValueError(
            f"LDA unbalanced_risk: num_sampled must be an integer >= N = {logits.shape[0]} (the "
            f"sampled RoIs include the positives), got {num_sampled!r}"
        )
    z = logits.to(_compute_dtype(logits))
    if z.shape[0] == 0:
        return z.sum() * 0.0  # F.cross_entropy's mean over zero rows is 0/0 = NaN.
    if num_sampled is None:
        return F.cross_entropy(z, labels.long(), reduction="mean")
    return F.cross_entropy(z, labels.long(), reduction="sum") / num_sampled


def balanced_risk(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_counts: Union[torch.Tensor, Sequence[float]],
    norm: str = "code",
) -> torch.Tensor:
    """Balanced empirical risk eps_b: importance-weighted cross-entropy (paper eq. 5, spec §2.2).

    With ``w_c = 1 / (C n_c)`` (:func:`lda_class_weights`) and per-sample CE ``l_i`` of h:

    - ``norm="code"``: ``sum_i w_{y_i} l_i`` (the authors' code; its expectation is
      ``N / N_tot`` times the class-balanced mean CE).
    - ``norm="mean"``: ``(1/N) sum_i w~_{y_i} l_i`` with ``w~_c = N_tot / (C n_c)``, i.e.
      ``code * N_tot / N``.
    - ``norm="self_norm"``: ``sum_i w_{y_i} l_i / sum_i w_{y_i}``.

    The three differ in scale by orders of magnitude, and the adaptive alpha multiplying this
    term is calibrated on ``code`` (spec §2.3, §8); the caller should log which one is in use.

    Args:
        logits: (N, C) logits of h (any float dtype). The weights and the loss are computed in
            float32 even for fp16/bf16 logits: the smallest LVIS weight ~1.6e-8 is 0 in fp16.
        labels: (N,) integer labels in [0, C).
        class_counts: (C,) raw training counts per class (see :func:`lda_class_weights`; zero
            counts are clamped to 1). N_tot is the sum of the clamped counts. Any device; the
            weights are moved to the logits' device.
        norm: one of :data:`BALANCED_NORMS`.

    Returns:
        Scalar in float32 (float64 for float64 logits). For N = 0 a zero still connected to
        ``logits``.

    Raises:
        ValueError: if ``norm`` is unknown, shapes or dtypes do not match, ``class_counts`` does
            not have C entries or holds negative/non-finite values, or labels are outside [0, C).
    """
    if not isinstance(norm, str) or norm not in BALANCED_NORMS:
        raise ValueError(
            f"Unknown LDA balanced-risk norm {norm!r}; expected one of {list(BALANCED_NORMS)}"
        )
    _check_logits_labels(logits, labels, "balanced_risk")
    counts = _clamped_counts(class_counts)
    if counts.numel() != logits.shape[1]:
        raise ValueError(
            f"LDA balanced_risk: class_counts has {counts.numel()} entries but the logits have "
            f"C = {logits.shape[1]} columns; pass one count per foreground class"
        )
    dtype = _compute_dtype(logits)
    z = logits.to(dtype)
    if z.shape[0] == 0:
        return z.sum() * 0.0

    num_classes = counts.numel()
    if norm == "mean":
        # w~_c = N_tot / (C n_c) in float64 (N_tot ~ 1.27e6 on LVIS), then float32: <= N_tot / C.
        class_w = counts.sum() / (num_classes * counts)
    else:
        # 1 / (C n_c) >= ~1.6e-8 on LVIS: representable in float32, 0 in float16.
        class_w = 1.0 / (num_classes * counts)
    y = labels.long()
    w = class_w.to(device=z.device, dtype=dtype)[y]
    ce = F.cross_entropy(z, y, reduction="none")
    if norm == "code":
        return (w * ce).sum()
    if norm == "mean":
        return (w * ce).mean()
    return (w * ce).sum() / w.sum()


# ---------------------------------------------------------------- adaptive factor alpha


def top1_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Number of samples whose argmax over the logits equals the label (no gradient).

    A count rather than a percentage, so that the predictor can all-reduce
    ``(correct_u, correct_b, N)`` and every rank derives the same accuracies and alpha (spec §3).
    Ties go to the lowest class index (``torch.argmax``); tie-free inputs are assumed (spec §8).

    Args:
        logits: (N, C) logits of h' or h.
        labels: (N,) integer labels in [0, C).

    Returns:
        Scalar float32 tensor on the logits' device, detached; 0 for N = 0. Exact for N < 2**24.
    """
    _check_logits_labels(logits, labels, "top1_correct")
    with torch.no_grad():
        return (logits.argmax(dim=1) == labels.long()).sum().to(torch.float32)


def top1_accuracy_percent(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 training accuracy in **percent** (0-100), without gradient (spec §2.3).

    The code's alpha uses percent units; with fractions alpha would be ``100**gamma`` times
    smaller (spec §8). Under DDP, prefer all-reducing :func:`top1_correct` and N.

    For N = 0 this returns 0.0: there is no measurement, and the caller must not write it into the
    ring buffers (spec §2.6 skips the buffer update when there are no positives). 0 rather than
    NaN, because a NaN written by mistake would make alpha NaN for the next L iterations.

    Args:
        logits: (N, C) logits of h' or h.
        labels: (N,) integer labels in [0, C).

    Returns:
        Scalar float32 tensor on the logits' device, detached.
    """
    correct = top1_correct(logits, labels)
    return correct * (100.0 / max(labels.numel(), 1))


def _check_rings(ring_u: torch.Tensor, ring_b: torch.Tensor) -> None:
    for name, ring in (("ring_u", ring_u), ("ring_b", ring_b)):
        if not isinstance(ring, torch.Tensor) or ring.dim() != 1 or ring.numel() == 0:
            got = tuple(ring.shape) if isinstance(ring, torch.Tensor) else type(ring).__name__
            raise ValueError(f"LDA {name} must be a non-empty 1-D (L,) tensor, got {got}")
        if not ring.dtype.is_floating_point:
            raise ValueError(
                f"LDA {name} must be floating point (percent accuracies), got {ring.dtype}"
            )
    if ring_u.shape != ring_b.shape:
        raise ValueError(
            f"LDA ring buffers must have the same length L, got {tuple(ring_u.shape)} and "
            f"{tuple(ring_b.shape)}"
        )


def _gap64(ring_u: torch.Tensor, ring_b: torch.Tensor) -> torch.Tensor:
    # Detached float64 mean(U) - mean(B); the rings are buffers, but never let alpha carry a graph.
    return ring_u.detach().double().mean() - ring_b.detach().double().mean()


def accuracy_gap(ring_u: torch.Tensor, ring_b: torch.Tensor) -> torch.Tensor:
    """Delta = mean(U) - mean(B) over all L slots, in percentage points, unclamped (no gradient).

    Positive when h' (unbalanced) is ahead of h (balanced) on recent training batches. Every slot
    counts, including the zero-initialised ones not yet written: during the first L iterations
    that shrinks Delta, an implicit warm-up of the code (spec §2.3).

    Args:
        ring_u, ring_b: (L,) percent accuracies of h' and h, one slot per iteration.

    Returns:
        Scalar tensor, float32 (float64 for float64 rings), detached, on the rings' device.
        Computed in float64.
    """
    _check_rings(ring_u, ring_b)
    return _gap64(ring_u, ring_b).to(_compute_dtype(ring_u))


def adaptive_alpha(ring_u: torch.Tensor, ring_b: torch.Tensor, gamma: float) -> torch.Tensor:
    """Self-adaptive factor ``alpha = max(Delta, 0) ** gamma`` (paper eq. 6, code semantics).

    ``Delta`` is :func:`accuracy_gap` (percent units, all L slots, zero-initialised slots count).
    The caller writes the current batch's accuracies into slot ``step % L`` *before* calling this,
    so the current batch counts. alpha is a constant for the optimiser (no gradient), 0 while h
    is at least as accurate as h', and at most ``100 ** gamma``.

    Args:
        ring_u, ring_b: (L,) ring buffers of percent accuracies of h' and h.
        gamma: exponent, finite and > 0 (1.5 for LVIS, 2.0 for ImageNet-LT).

    Returns:
        Scalar tensor, float32 (float64 for float64 rings), detached, on the rings' device.

    Raises:
        ValueError: if the rings are not equal-length non-empty 1-D float tensors or ``gamma`` is
            not finite and > 0 (with gamma = 0, alpha would be 1 even when h is ahead).
    """
    g = _as_float(gamma)
    if not (math.isfinite(g) and g > 0):
        raise ValueError(f"LDA gamma must be finite and > 0, got {gamma!r}")
    _check_rings(ring_u, ring_b)
    # In float64 throughout (a scalar, so free); cast back only at the end.
    return _gap64(ring_u, ring_b).clamp(min=0.0).pow(g).to(_compute_dtype(ring_u))


def auto_ring_length(class_counts: Union[torch.Tensor, Sequence[float]], batch_size: int) -> int:
    """The code's ring length when ``LENGTH <= 0``: ``max(1, floor(N_tot / (min_c n_c * batch)))``.

    Roughly the number of iterations in which the rarest class is seen once. Counts are clamped to
    >= 1 as in :func:`lda_class_weights`. What ``batch_size`` counts (images in classification;
    images or positive RoIs per iteration in detection) is the caller's choice.

    Raises:
        ValueError: on invalid counts or a ``batch_size`` that is not a positive integer.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"LDA batch_size must be a positive integer, got {batch_size!r}")
    counts = _clamped_counts(class_counts)
    return max(1, math.floor(float(counts.sum()) / (float(counts.min()) * batch_size)))


# ---------------------------------------------------------------- divergence proxy


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Row-wise x / ||x||; rows with norm <= eps become 0 (cosine 0) and pass no gradient.

    A plain ``x / max(||x||, eps)`` (F.normalize) avoids the NaN of 0/0 but still back-propagates
    ``1/eps``-sized gradients from a zero row, e.g. a class center whose features cancel. Such a
    vector has no direction, so here it contributes neither a cosine nor a gradient.
    """
    norm = x.norm(dim=1, keepdim=True)
    # Both branches of where are finite, so the masked-out branch cannot leak NaN into backward.
    return torch.where(norm > _COS_EPS, x / norm.clamp(min=_COS_EPS), torch.zeros_like(x))


def _class_centers(f: torch.Tensor, labels: torch.Tensor):
    """Per-batch class centers: uniq (K,), inverse (N,), one-hot (N, K), counts (K,), mu (K, D).

    K = C_b is the number of distinct labels present.

    The mean of the *unnormalised* features, not detached (the code lets gradients flow through
    the centers, spec §2.4/§8). A one-hot matmul rather than index_add, whose CUDA kernel adds
    with atomics (run-to-run float differences). torch.unique syncs with the host (K is needed).
    """
    uniq, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    onehot = F.one_hot(inverse, num_classes=uniq.numel()).to(f.dtype)  # (N, K)
    n = counts.to(f.dtype)
    mu = (onehot.t() @ f) / n[:, None]
    return uniq, inverse, onehot, n, mu


def intra_class_compactness(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Intra-class cosine compactness L_intra, the code's form (spec §2.4).

    ``d_c = (1/|c|) sum_{i: y_i = c} (1 - cos(F_i, mu_c))`` with ``mu_c`` the batch mean of the
    unnormalised features of class c, gradient flowing through mu_c. L_intra is the mean of d_c
    over the classes with >= 2 samples in the batch (paper eq. 7 averages over all C_b present
    classes; a singleton's d_c is 0, so only the denominator differs). 0 if no class has two
    samples. In [0, 2]; invariant to scaling F by s > 0, to sample order and to class relabelling.

    Args:
        features: (N, D) projected features F = p(z) of the positive samples (any float dtype;
            computed in float32 for fp16/bf16).
        labels: (N,) integer class labels (any values; only equality matters).

    Returns:
        Scalar in float32 (float64 for float64 features), connected to ``features`` also when it
        is 0 (N = 0, or only singletons).
    """
    _check_features_labels(features, labels, "intra_class_compactness")
    f = features.to(_compute_dtype(features))
    if f.shape[0] == 0:
        return f.sum() * 0.0
    _, inverse, onehot, n, mu = _class_centers(f, labels)
    cos = (_unit(f) * _unit(mu)[inverse]).sum(dim=1)  # (N,)
    d_intra = (onehot.t() @ (1.0 - cos)) / n  # (K,)
    multi = (n >= 2).to(f.dtype)
    # Masked mean; with no class of >= 2 samples the numerator is an exact 0 and the clamp keeps
    # the denominator at 1, so the result is 0 and no host sync is needed to branch.
    return (d_intra * multi).sum() / multi.sum().clamp(min=1.0)


def inter_class_separation(
    features: torch.Tensor,
    labels: torch.Tensor,
    margin: float = 1.0,
    weighting: str = "none",
    class_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Inter-class center separation L_inter (paper eq. 8, spec §2.4).

    For the C_b classes present, with batch centers mu (as in :func:`intra_class_compactness`) the
    hinge over ordered pairs i != j is ``H_ij = max(0, margin - (1 - cos(mu_i, mu_j)))``; with
    margin 1 it is ``max(0, cos(mu_i, mu_j))``, pushing centers to be orthogonal or further apart.
    The pairs are combined as in :data:`INTER_WEIGHTINGS`. C_b <= 1 gives 0 (not 0/0 = NaN).

    Args:
        features: (N, D) projected features F = p(z) of the positive samples (computed in
            float32 for fp16/bf16).
        labels: (N,) integer labels; with ``weighting != "none"`` they index ``class_weights``
            and must lie in [0, len(class_weights)).
        margin: Delta_m, finite and > 0 (1 in the paper and the code).
        weighting: one of :data:`INTER_WEIGHTINGS`.
        class_weights: (C,) positive class weights w (:func:`lda_class_weights`), required for
            ``code`` and ``paper``, ignored for ``none``.

    Returns:
        Scalar in float32 (float64 for float64 features), connected to ``features``. Mean forms
        (``none``, ``code``) lie in [0, margin].

    Raises:
        ValueError: on an unknown ``weighting``, a bad ``margin``, shape/dtype mismatches, missing
            or non-positive ``class_weights``, or labels outside their range.
    """
    if not isinstance(weighting, str) or weighting not in INTER_WEIGHTINGS:
        raise ValueError(
            f"Unknown LDA inter-class weighting {weighting!r}; expected one of "
            f"{list(INTER_WEIGHTINGS)}"
        )
    m = _as_float(margin)
    if not (math.isfinite(m) and m > 0):
        raise ValueError(f"LDA inter-class margin must be finite and > 0, got {margin!r}")
    _check_features_labels(features, labels, "inter_class_separation")
    if weighting != "none":
        if not isinstance(class_weights, torch.Tensor) or class_weights.dim() != 1:
            raise ValueError(
                f"LDA inter_class_separation with weighting={weighting!r} needs class_weights, a "
                "(C,) tensor (e.g. lda_class_weights(class_counts)); use weighting='none' otherwise"
            )
        if not bool(torch.isfinite(class_weights).all()) or bool((class_weights <= 0).any()):
            raise ValueError("LDA class_weights must be finite and > 0")
        if labels.numel() > 0 and (
            int(labels.min()) < 0 or int(labels.max()) >= class_weights.numel()
        ):
            raise ValueError(
                "LDA inter_class_separation: labels must index class_weights, i.e. lie in "
                f"[0, {class_weights.numel()}), got range "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )

    f = features.to(_compute_dtype(features))
    if f.shape[0] == 0:
        return f.sum() * 0.0
    uniq, _, _, _, mu = _class_centers(f, labels)
    num_present = uniq.numel()
    if num_present <= 1:
        return f.sum() * 0.0  # no pair: the mean over C_b (C_b - 1) = 0 pairs would be NaN.

    u = _unit(mu)
    cos = u @ u.t()  # (K, K)
    # relu, not clamp: its gradient at exactly 0 is 0, so a zero center (cosine 0 with every
    # other center, hinge input exactly 0 when margin = 1) sends no eps-sized-denominator gradient.
    hinge = F.relu(cos - (1.0 - m))
    off_diag = ~torch.eye(num_present, dtype=torch.bool, device=f.device)
    if weighting == "none":
        return hinge[off_diag].mean()

    w = class_weights.to(device=f.device, dtype=f.dtype)[uniq.long()]
    pair_w = (w[:, None] + w[None, :]) * off_diag.to(f.dtype)  # w_i + w_j, zero on the diagonal
    weighted = (pair_w * hinge).sum()
    if weighting == "paper":
        return weighted
    return weighted / pair_w.sum()


# ---------------------------------------------------------------- detection head


def fgbg_loss(fgbg_logits: torch.Tensor, is_foreground: torch.Tensor) -> torch.Tensor:
    """fg/bg loss of the head g: mean 2-way softmax CE over all R sampled RoIs (spec §2.6).

    Column 0 of ``fgbg_logits`` is foreground and column 1 background. This replaces the
    (C+1)-way classification loss; which foreground class it is, is left to h' and h.

    Args:
        fgbg_logits: (R, 2) logits of g (computed in float32 for fp16/bf16).
        is_foreground: (R,) bool, True for positive RoIs (matched to a GT box).

    Returns:
        Scalar in float32 (float64 for float64 logits); for R = 0 a zero connected to the logits.

    Raises:
        ValueError: if the logits are not (R, 2) floats or ``is_foreground`` is not an (R,) bool
            tensor.
    """
    if (
        not isinstance(fgbg_logits, torch.Tensor)
        or fgbg_logits.dim() != 2
        or fgbg_logits.shape[1] != 2
    ):
        got = (
            tuple(fgbg_logits.shape)
            if isinstance(fgbg_logits, torch.Tensor)
            else type(fgbg_logits).__name__
        )
        raise ValueError(f"LDA fgbg_loss expects (R, 2) logits [foreground, background], got {got}")
    if not fgbg_logits.dtype.is_floating_point:
        raise ValueError(f"LDA fgbg_loss expects floating-point logits, got {fgbg_logits.dtype}")
    if (
        not isinstance(is_foreground, torch.Tensor)
        or is_foreground.shape != (fgbg_logits.shape[0],)
        or is_foreground.dtype != torch.bool
    ):
        got = (
            f"{tuple(is_foreground.shape)} {is_foreground.dtype}"
            if isinstance(is_foreground, torch.Tensor)
            else type(is_foreground).__name__
        )
        raise ValueError(
            f"LDA fgbg_loss expects is_foreground as a ({fgbg_logits.shape[0]},) bool tensor, got "
            f"{got}; e.g. gt_classes < num_classes"
        )
    z = fgbg_logits.to(_compute_dtype(fgbg_logits))
    if z.shape[0] == 0:
        return z.sum() * 0.0
    target = (~is_foreground).long()  # 0 = foreground column, 1 = background column
    return F.cross_entropy(z, target, reduction="mean")


def lda_probs(fgbg_logits: torch.Tensor, balanced_logits: torch.Tensor) -> torch.Tensor:
    """Detection scores: ``s_c = P(fg) * softmax(h)_c`` and the background score P(bg) (spec §4).

    The (C+1)-vector ``[s_0, ..., s_{C-1}, P(bg)]`` sums to 1 and puts background last, so it
    feeds Detectron2's standard post-processing (which drops the last column). Within a box the
    classes rank as h does; P(fg) scales them all equally. Only g and h are used: h', p and the
    alpha buffers do not affect inference.

    Args:
        fgbg_logits: (R, 2) logits of g, columns [foreground, background].
        balanced_logits: (R, C) logits of h.

    Returns:
        (R, C+1) scores in float32 for fp16/bf16/float32 inputs (float64 if either is float64).

    Raises:
        ValueError: if the shapes are not (R, 2) and (R, C) with C >= 1 and the same R.
    """
    if (
        not isinstance(fgbg_logits, torch.Tensor)
        or not isinstance(balanced_logits, torch.Tensor)
        or fgbg_logits.dim() != 2
        or fgbg_logits.shape[1] != 2
        or balanced_logits.dim() != 2
        or balanced_logits.shape[1] < 1
        or balanced_logits.shape[0] != fgbg_logits.shape[0]
    ):
        shapes = [
            tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            for t in (fgbg_logits, balanced_logits)
        ]
        raise ValueError(
            f"LDA lda_probs expects (R, 2) fg/bg logits and (R, C) balanced logits with C >= 1, "
            f"got {shapes[0]} and {shapes[1]}"
        )
    dtype = torch.promote_types(_compute_dtype(fgbg_logits), _compute_dtype(balanced_logits))
    p = F.softmax(fgbg_logits.to(dtype), dim=1)
    q = F.softmax(balanced_logits.to(dtype), dim=1)
    return torch.cat([p[:, :1] * q, p[:, 1:]], dim=1)
