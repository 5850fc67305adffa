"""BAGS, Balanced Group Softmax: class groups, logit layout, training loss and merged scores.

Reference: Li, Wang, Kang, Tang, Wang, Li & Feng, "Overcoming Classifier Imbalance for Long-tail
Object Detection with Balanced Group Softmax", CVPR 2020, §4 (eqs. 3-5); behaviour follows the
authors' released code (FishYuLi/BalancedGroupSoftmax, ``gs_bbox_head_with0.py``), as described
in the project's BAGS spec.

Shape shorthand used below:
    R: number of sampled RoIs in the loss call (may be 0).
    C: number of foreground classes. Labels are in [0, C]; C is background, as in Detectron2's
       ``gt_classes`` convention (the authors' mmdet v1 code puts background at 0).
    N: number of non-empty foreground groups G_1..G_N (4 on LVIS); G_0 is the background group.
    K: number of classifier logits, ``C + N + 2``: the slices of G_0 (2 logits) and of every G_n
       (1 + |G_n| logits), laid end to end.

BAGS replaces the box head's single (C+1)-way softmax with N+1 independent softmaxes over
disjoint slices of one K-output linear layer. Classes are grouped by their number of training
instances, so a tail class only competes with other tail classes and its classifier weights are no
longer pushed down by head-class positives. Every foreground group has an extra "others" slot
(background or a class of another group) whose training RoIs are subsampled; G_0 is a binary
``[bg, fg]`` softmax. At test time each group's class probabilities are multiplied by G_0's
foreground probability (:func:`bags_probs`).

Precision: slicing, softmaxes and cross-entropies run in float32 for fp16/bf16 logits (float64
logits stay float64), as the authors' code forces fp32 for the loss and the merge.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_BIN_EDGES",
    "BAGSLayout",
    "bags_partition",
    "bags_layout",
    "bags_sample_weights",
    "bags_loss",
    "bags_probs",
]

#: Instance-count bin edges of the paper (eq. 3 with s^l = 0, 10, 10^2, 10^3): G_1 = [0, 10),
#: G_2 = [10, 100), G_3 = [100, 1000), G_4 = [1000, inf). Table 4's ablations use ``(100,)``
#: (N = 2) and ``(5, 10, 50, 100, 500, 1000, 5000)`` (N = 8).
DEFAULT_BIN_EDGES = (10, 100, 1000)


def bags_partition(
    instance_counts: Union[torch.Tensor, Sequence[float]],
    bin_edges: Sequence[float] = DEFAULT_BIN_EDGES,
) -> torch.Tensor:
    """Group (bin) index of every foreground class from its number of training instances.

    Class j goes to bin ``1 + #{e in bin_edges : e <= count(j)}``, so an edge itself opens the
    next bin (with the default edges: 9 -> 1, 10 -> 2, 100 -> 3, 1000 -> 4), as the paper's
    ``s^l <= N(j) < s^h`` and the authors' strict ``<`` comparisons.

    The counts must be *instance* counts (LVIS ``instance_count``: boxes), not image counts: the
    LVIS r/c/f frequency is image-based but BAGS groups are not. Take them from the training split
    the detector is trained on; hard-coding another dataset version's counts is wrong.

    Zero counts: none on the official LVIS v0.5/v1 train jsons (minimum 1), but a filtered or
    subsampled annotation set can have them. A class with count 0 lands in bin 1; it then never
    has a positive RoI, so training only pushes its logit down inside G_1. This is allowed (no
    error), since the class may simply be absent from a small split.

    Args:
        instance_counts: (C,) finite, non-negative training instance counts per foreground class,
            in contiguous class order (map dataset category ids through the dataset's
            id -> contiguous mapping first).
        bin_edges: finite, positive, strictly increasing edges; ``len(bin_edges) + 1`` bins.
            An empty sequence puts every class in bin 1 (a single foreground group).

    Returns:
        (C,) int64 tensor with values in ``1 .. len(bin_edges) + 1``. Some bins may be empty;
        :func:`bags_layout` drops them.

    Raises:
        ValueError: if the counts are not a non-empty 1-D vector of finite non-negative numbers,
            or the edges are not a 1-D sequence of finite, positive, strictly increasing numbers.
    """
    counts = torch.as_tensor(instance_counts, dtype=torch.float64).detach().cpu()
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(
            "BAGS instance_counts must be a non-empty 1-D (C,) vector, got shape "
            f"{tuple(counts.shape)}"
        )
    if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        raise ValueError("BAGS instance_counts must be finite and non-negative")

    try:
        edges = torch.as_tensor(bin_edges, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"BAGS bin_edges must be a sequence of numbers, got {bin_edges!r}"
        ) from err
    if edges.dim() != 1:
        raise ValueError(f"BAGS bin_edges must be a 1-D sequence, got shape {tuple(edges.shape)}")
    if not bool(torch.isfinite(edges).all()) or bool((edges <= 0).any()):
        raise ValueError(f"BAGS bin_edges must be finite and > 0, got {edges.tolist()}")
    if bool((edges.diff() <= 0).any()):
        raise ValueError(f"BAGS bin_edges must be strictly increasing, got {edges.tolist()}")

    # (C, E) comparison table; with E = 0 the sum is 0 and every class lands in bin 1.
    return 1 + (counts[:, None] >= edges[None, :]).sum(dim=1, dtype=torch.int64)


@dataclass(frozen=True, eq=False)
class BAGSLayout:
    """Where every group and class lives in the K classifier logits; built by :func:`bags_layout`.

    ``eq=False``: the tensor fields make field-wise ``==`` ambiguous, so layouts compare (and hash)
    by identity.

    Attributes:
        num_classes: C.
        group_bins: bin index (1-based, from :func:`bags_partition`) of each non-empty foreground
            group, ascending; length N. With LVIS and the default edges: ``(1, 2, 3, 4)``.
        group_sizes: ``|G_n|`` for n = 1..N; they sum to C.
        slices: N+1 ``(start, length)`` pairs that tile ``[0, K)`` in order. G_0 first,
            ``(0, 2)`` with columns ``[bg, fg]``; then group n with 1 + |G_n| columns
            ``[others_n, classes of G_n in ascending class id]``.
        class_column: (C,) int64, the logit column of class j.
        label_targets: (N+1, C+1) int64, the target index *inside slice n* for an RoI labelled y
            (y = C is background). Row 0: 0 for background, 1 (fg) otherwise. Row n >= 1: the
            position 1..|G_n| of y inside G_n, or 0 ("others") for background and for classes
            of other groups.
        num_logits: K = C + N + 2.
    """

    num_classes: int
    group_bins: Tuple[int, ...]
    group_sizes: Tuple[int, ...]
    slices: Tuple[Tuple[int, int], ...]
    class_column: torch.Tensor
    label_targets: torch.Tensor
    num_logits: int

    @property
    def num_groups(self) -> int:
        """N, the number of foreground groups (G_0 not counted)."""
        return len(self.group_sizes)

    def to(self, device) -> "BAGSLayout":
        """A copy whose tensors live on ``device`` (the integer metadata is shared)."""
        return dataclasses.replace(
            self,
            class_column=self.class_column.to(device),
            label_targets=self.label_targets.to(device),
        )


def bags_layout(partition: torch.Tensor) -> BAGSLayout:
    """Logit layout and label remapping table from a class -> bin assignment.

    Bins that hold no class are dropped (spec §7): such a group would get a 1-logit slice whose
    softmax is always 1, so its loss and output would be trivially constant. N is therefore the
    number of *non-empty* bins, and ``layout.group_bins`` records which bins they are (a
    checkpoint's K depends on it). On LVIS v1 with the default edges nothing is dropped:
    |G_1..G_4| = 200 / 412 / 334 / 257 and K = 1209.

    Args:
        partition: (C,) integer tensor of bin indices >= 1, as returned by
            :func:`bags_partition` (any other 1-based assignment works too).

    Returns:
        A :class:`BAGSLayout` with its tensors on the CPU; move it with ``layout.to(device)``.

    Raises:
        ValueError: if ``partition`` is not a non-empty 1-D integer vector with values >= 1.
    """
    part = torch.as_tensor(partition)
    if part.dim() != 1 or part.numel() == 0:
        raise ValueError(
            f"BAGS partition must be a non-empty 1-D (C,) vector, got shape {tuple(part.shape)}"
        )
    if part.dtype == torch.bool or part.is_floating_point() or part.is_complex():
        raise ValueError(
            f"BAGS partition must hold integer bin indices (bags_partition's output), got dtype "
            f"{part.dtype}"
        )
    part = part.detach().cpu().to(torch.int64)
    if bool((part < 1).any()):
        raise ValueError(
            f"BAGS partition bin indices must be >= 1 (1-based), got minimum {int(part.min())}"
        )

    num_classes = part.numel()
    bins = torch.unique(part, sorted=True).tolist()  # only non-empty bins appear
    class_column = torch.empty(num_classes, dtype=torch.int64)
    label_targets = torch.zeros(len(bins) + 1, num_classes + 1, dtype=torch.int64)
    label_targets[0, :num_classes] = 1  # G_0: [bg, fg], background (label C) stays 0
    slices = [(0, 2)]
    sizes = []
    start = 2
    for n, b in enumerate(bins, start=1):
        members = torch.nonzero(part == b).flatten()  # ascending class ids
        size = members.numel()
        positions = torch.arange(1, size + 1, dtype=torch.int64)  # 0 is "others"
        class_column[members] = start + positions
        label_targets[n, members] = positions
        slices.append((start, 1 + size))
        sizes.append(size)
        start += 1 + size

    return BAGSLayout(
        num_classes=num_classes,
        group_bins=tuple(int(b) for b in bins),
        group_sizes=tuple(sizes),
        slices=tuple(slices),
        class_column=class_column,
        label_targets=label_targets,
        num_logits=start,
    )


def _check_labels(labels: torch.Tensor, layout: BAGSLayout) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"BAGS labels must be a 1-D (R,) tensor, got {shape}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"BAGS labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.numel() and bool(((labels < 0) | (labels > layout.num_classes)).any()):
        raise ValueError(
            f"BAGS labels must be in [0, {layout.num_classes}] (C = {layout.num_classes} is "
            f"background), got min {int(labels.min())}, max {int(labels.max())}; map dataset "
            "category ids to contiguous ids first"
        )


def _check_ratio(others_ratio) -> float:
    try:
        beta = float(others_ratio)
    except (TypeError, ValueError) as err:
        raise ValueError(f"BAGS others_ratio must be a number, got {others_ratio!r}") from err
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(
            f"BAGS others_ratio (beta) must be finite and > 0, got {others_ratio!r}; the paper "
            "uses 8, and a large value such as 1000 keeps every 'others' RoI"
        )
    return beta


def _check_logits(logits: torch.Tensor, layout: BAGSLayout) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"BAGS logits must be a 2-D (R, K) tensor, got {shape}")
    if logits.shape[1] != layout.num_logits:
        raise ValueError(
            f"BAGS logits must have K = C + N + 2 = {layout.num_logits} columns for this layout "
            f"(C = {layout.num_classes}, N = {layout.num_groups}), got {logits.shape[1]}; the "
            "classifier must output layout.num_logits values, not C + 1"
        )
    if not logits.is_floating_point():
        raise ValueError(f"BAGS logits must be floating point, got dtype {logits.dtype}")


def bags_sample_weights(
    labels: torch.Tensor,
    layout: BAGSLayout,
    others_ratio: float = 8.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """0/1 RoI weights of every group (spec §2.5): which RoIs each group's loss averages over.

    - G_0: every RoI (all background RoIs and all foreground RoIs, as "fg").
    - G_n, n >= 1, with in-group positives P_n = {i : y_i in G_n} and the rest O_n (background and
      other groups' classes, not stratified): every positive, plus ``m_n = floor(beta * |P_n|)``
      "others" drawn uniformly without replacement, or all of O_n when ``m_n >= |O_n|``. So an
      active group weights ``|P_n| + min(m_n, |O_n|)`` RoIs. Without the subsampling "others"
      would dominate every group, as the single background class dominates a plain softmax.
    - A group without positives weights nothing: it is ignored for this batch (paper §4.3).

    Randomness: the draw is a random ranking of the RoIs, made from ``N x R`` float64 uniforms
    taken from ``generator`` on the CPU (``None``: torch's default CPU generator) and then moved
    to ``labels.device``; each group keeps its m_n lowest-ranked "others". The generator
    therefore advances by the same amount for any labels of the same length, the same seed gives
    the same weights on every device, and there is no host/device synchronisation. Seed one
    generator per rank: the authors draw per GPU with an unseeded numpy RNG.

    Args:
        labels: (R,) integer labels in [0, C]; C is background.
        layout: from :func:`bags_layout`; its tensors are moved to ``labels.device`` if needed.
        others_ratio: beta, finite and > 0 (8 in the paper).
        generator: a CPU ``torch.Generator``, or None.

    Returns:
        (N+1, R) float32 tensor of 0/1 weights on ``labels.device``; row 0 is G_0.

    Raises:
        ValueError: on labels that are not a 1-D integer tensor in [0, C], a bad ``others_ratio``,
            or a generator that is not on the CPU.
    """
    _check_labels(labels, layout)
    beta = _check_ratio(others_ratio)
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"BAGS sampling draws on the CPU; pass a CPU torch.Generator, got one on "
            f"{generator.device} (results would then depend on the device)"
        )
    device = labels.device
    num_rois = labels.numel()
    num_groups = layout.num_groups

    targets = layout.label_targets.to(device)[1:, labels.long()]  # (N, R)
    positive = targets > 0
    keys = torch.rand(num_groups, num_rois, generator=generator, dtype=torch.float64)
    # Keys are in [0, 1); positives get 2 so that they rank after every "others" RoI, and the
    # ranks of the "others" are then a uniform random permutation of 0 .. |O_n| - 1.
    keys = keys.to(device).masked_fill(positive, 2.0)
    order = keys.argsort(dim=1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(num_rois, device=device).expand(num_groups, num_rois))
    # m_n = floor(beta |P_n|), in float64 so that a huge beta saturates instead of overflowing;
    # |P_n| = 0 gives m_n = 0, so an inactive group selects nothing.
    quota = torch.floor(positive.sum(dim=1).to(torch.float64) * beta)
    chosen = positive | (rank.to(torch.float64) < quota[:, None])
    return torch.cat([torch.ones(1, num_rois, device=device), chosen.to(torch.float32)], dim=0)


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


def bags_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    layout: BAGSLayout,
    others_ratio: float = 8.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Per-group BAGS classification losses; the training loss is their sum.

    ``L_n = sum_i w_i^n CE_i^n / max(sum_i w_i^n, 1)`` with ``CE_i^n = -log softmax(z_i[slice_n])
    [target_i^n]`` and w from :func:`bags_sample_weights`. Each group is averaged over its own
    selected RoIs and every group has weight 1 (the authors' code; the paper's eq. 5 gives only
    the unnormalised sum), so ``L_cls`` is about (number of active groups) times a plain CE in
    scale. G_0's 2-way softmax CE equals the paper's sigmoid CE on ``z_fg - z_bg``.

    An inactive group (no positive in this batch) gives exactly 0 and a zero gradient on its
    slice: its terms are multiplied by weight 0 and the denominator is clamped to 1, so there is
    no 0/0. The zero stays in the graph, which keeps DDP happy with one sliced K-output layer.

    Args:
        logits: (R, K) raw classifier logits (any float dtype; fp16/bf16 are computed in
            float32, float64 stays float64).
        labels: (R,) integer labels in [0, C]; C is background. Moved to ``logits.device``.
        layout: from :func:`bags_layout`; its tensors are moved to ``logits.device`` if needed
            (call ``layout.to(device)`` once to avoid the per-call copy).
        others_ratio: beta of the "others" subsampling, finite and > 0 (8 in the paper).
        generator: CPU ``torch.Generator`` for the subsampling (see :func:`bags_sample_weights`).

    Returns:
        (N+1,) tensor ``[L_0, L_1, ..., L_N]`` in float32 (float64 for float64 logits). For
        R = 0 it is all zeros, still connected to ``logits`` so that backward gives zero
        gradients instead of NaN or an unused-parameter error.

    Raises:
        ValueError: if ``logits`` is not (R, K) floating point with K = ``layout.num_logits``,
            ``labels`` is not a (R,) integer tensor in [0, C], or ``others_ratio`` is not finite
            and > 0.
    """
    _check_logits(logits, layout)
    _check_labels(labels, layout)
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"BAGS labels must have one entry per logits row: got {labels.shape[0]} labels for "
            f"{logits.shape[0]} rows"
        )
    z = logits.to(_compute_dtype(logits))
    labels = labels.to(z.device).long()
    weights = bags_sample_weights(labels, layout, others_ratio, generator).to(z.dtype)
    targets = layout.label_targets.to(z.device)[:, labels]  # (N+1, R)

    # A fused log-softmax + NLL per slice; an exp followed by a log would overflow. One split
    # rather than N+1 slicings (the slices tile [0, K) in order): the backward of a slice fills a
    # whole (R, K) zero gradient per group and adds them up, the split's concatenates once.
    chunks = z.split([length for _, length in layout.slices], dim=1)
    ce = torch.stack(
        [F.cross_entropy(chunk, targets[n], reduction="none") for n, chunk in enumerate(chunks)]
    )  # (N+1, R); for R = 0 an empty tensor that is still connected to z
    return (weights * ce).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def bags_probs(logits: torch.Tensor, layout: BAGSLayout) -> torch.Tensor:
    """Merged BAGS scores (spec §3), background last, for Detectron2's ``predict_probs``.

    With ``q = softmax(z[G_0]) = (q_bg, q_fg)`` and ``p^n = softmax(z[G_n])``, class j of G_n
    scores ``s_j = q_fg * p^n[pos(j)]``; the "others" probabilities are dropped without
    renormalisation, and the last column is ``q_bg``. The row is not a distribution:
    ``sum_j s_j = q_fg * sum_n (1 - p^n[others])``, anywhere in [0, N q_fg]. The score threshold,
    per-class NMS and top-k act on these values; ``fast_rcnn_inference`` drops the last column.

    Never apply a softmax (or an argmax) over all K logits: the K columns are N+1 separate
    softmax spaces, not a class space.

    Args:
        logits: (R, K) raw classifier logits.
        layout: from :func:`bags_layout`; its tensors are moved to ``logits.device`` if needed.

    Returns:
        (R, C+1) scores in [0, 1], float32 for fp16/bf16 logits (float64 stays float64).

    Raises:
        ValueError: if ``logits`` is not (R, K) floating point with K = ``layout.num_logits``.
    """
    _check_logits(logits, layout)
    z = logits.to(_compute_dtype(logits))
    log_p = torch.cat(
        [F.log_softmax(z[:, start : start + length], dim=1) for start, length in layout.slices],
        dim=1,
    )  # (R, K): each slice normalised on its own
    log_q_bg, log_q_fg = log_p[:, 0:1], log_p[:, 1:2]
    # index_select: the same gather as log_p[:, class_column], about twice as fast on CPU.
    scores = (log_q_fg + log_p.index_select(1, layout.class_column.to(z.device))).exp()
    return torch.cat([scores, log_q_bg.exp()], dim=1)
