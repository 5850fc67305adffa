"""PCB, Pairwise Class Balance: confusion-matrix statistics, EMA, fightback targets and loss.

Reference: He, Zhang, Wei, Zhang & Sun, "Relieving Long-tailed Instance Segmentation via Pairwise
Class Balance", CVPR 2022 (arXiv 2201.02784), eqs. 3, 5, 9-11; behaviour follows the authors'
released code (megvii-research/PCB, ``cross_entropy_pcb_loss.py``, ``seesaw_pcb_loss.py``,
``eqlv2_pcb_loss.py``), as described in the project's PCB spec.

Shape shorthand used below:
    R: number of sampled RoIs in the loss call (fg + bg, may be 0).
    N: number of foreground RoIs among them (labels < C, may be 0).
    C: number of foreground classes. Labels are in [0, C]; C is background, as in Detectron2's
       ``gt_classes`` convention (the same index as in mmdet). The confusion matrix M is C x C,
       foreground only: background RoIs never touch it and soft targets put 0 on background.

PCB keeps an EMA confusion matrix ``M[i, j]``, the mean predicted probability on class j of the
foreground RoIs labelled i. Column-normalising it gives ``M_hat[i, j] ~ P(gt = i | predicted j)``;
a foreground RoI of class y is then trained toward ``(1 - a) onehot(y) + a M_hat[:, y]``. The
target is read from column y, the classes that get mistaken *for* y, so a tail class swallowed by
a head class receives probability mass back from the head class's own samples.

One update (one loss call; the reference makes three per iteration, one per recurrent step)::

    probs = softmax(z[fg, :C])                      # sigmoid(z[fg, :C]) for EQL v2
    stats = pcb_batch_statistics(probs, labels[fg])
    # all_reduce(SUM) stats across ranks -- on every rank, every call, even with N = 0
    pcb_ema_update(M, seen, stats)                  # renormalize_rows=False for EQL v2
    if pcb_active(it, start_iter, seen):
        t = pcb_fightback_targets(M, labels[fg])    # normalize_columns=False for EQL v2
        q = pcb_mixed_targets(labels, t, a_r, C)
        loss = soft_cross_entropy(z, q)             # CE variant; Seesaw/EQL v2 use q their way
    else:
        loss = cross_entropy(z, labels)             # the base loss, exactly

The matrix is read *after* this call's update, as in the reference. This module holds no state and
calls no collective: the caller owns the buffers (``M`` (C, C) float32, ``seen`` (C,) float64) and
the all-reduce, so the code runs single-process on CPU.

Precision: the statistics and the EMA are computed in float64 (the per-class sums of up to a few
hundred probabilities per call, and the EMA that runs for ~10^5 updates), M is stored in float32
as in the reference (even under AMP), targets and losses are float32 (float64 for float64 inputs).
"""

import math
import numbers
import operator
from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "pcb_batch_statistics",
    "pcb_ema_update",
    "pcb_fightback_targets",
    "pcb_mixed_targets",
    "soft_cross_entropy",
    "pcb_step_alphas",
    "pcb_active",
    "pairwise_bias",
]


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def _is_int_tensor(x) -> bool:
    return (
        isinstance(x, torch.Tensor)
        and x.dtype != torch.bool
        and not x.is_floating_point()
        and not x.is_complex()
    )


def _check_matrix(matrix, what: str = "matrix") -> int:
    """Validate a (C, C) float confusion matrix and return C."""
    if (
        not isinstance(matrix, torch.Tensor)
        or matrix.dim() != 2
        or matrix.shape[0] != matrix.shape[1]
        or matrix.shape[0] == 0
    ):
        raise ValueError(
            f"PCB {what} must be a non-empty square (C, C) tensor over the foreground classes, "
            f"got {_shape(matrix)}"
        )
    if not matrix.is_floating_point():
        raise ValueError(f"PCB {what} must be a float tensor, got {matrix.dtype}")
    return matrix.shape[0]


def _check_labels(labels, num_rows: int, high: int, what: str) -> None:
    """Validate (num_rows,) integer labels in [0, high)."""
    if not _is_int_tensor(labels) or labels.shape != (num_rows,):
        raise ValueError(
            f"PCB {what} must be a ({num_rows},) integer tensor with values in [0, {high}), got "
            f"{_shape(labels)}" + (f" {labels.dtype}" if isinstance(labels, torch.Tensor) else "")
        )
    if num_rows and bool(((labels < 0) | (labels >= high)).any()):
        raise ValueError(
            f"PCB {what} must lie in [0, {high}), got min {int(labels.min())}, "
            f"max {int(labels.max())}"
        )


def _within(t: torch.Tensor, low: float, high: float) -> bool:
    """Whether every entry of a non-empty float tensor lies in [low, high]; NaN fails, and so does
    inf with ``high = torch.finfo(dtype).max`` (one host synchronisation)."""
    lo, hi = torch.aminmax(t)
    return bool((lo >= low) & (hi <= high))


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise ValueError(f"PCB alpha must be a real number in [0, 1], got {alpha!r}")
    a = float(alpha)
    if not (0.0 <= a <= 1.0):  # also rejects NaN
        raise ValueError(
            f"PCB alpha must lie in [0, 1] (it mixes the one-hot and the fightback target), "
            f"got {alpha!r}"
        )
    return a


def pcb_batch_statistics(class_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-class sums and counts of one call's foreground probabilities (spec §2.1, Eq. 3).

    ``S[i, :] = sum of class_probs over the rows labelled i`` and ``n[i] = number of those rows``,
    returned as one (C, C+1) tensor ``[S | n]`` so that the caller all-reduces (SUM) a single
    tensor per update. Sums and counts are reduced, never per-rank means: averaging means is wrong
    as soon as ranks hold different numbers of RoIs of a class (spec §7 inv. 8).

    The rows are soft probabilities, not argmax votes (the paper's Eq. 2 is only exposition).
    Computed with one ``index_add_`` over N rows, O(N C) work and memory; no N x C x C tensor.

    Args:
        class_probs: (N, C) probabilities of the foreground classes for the N foreground RoIs,
            already selected by the caller (background RoIs never enter M): ``softmax(z[:, :C])``
            (background logit dropped, foreground re-normalised) for the CE and Seesaw variants,
            Seesaw on its raw class logits before the logit adjustment; element-wise
            ``sigmoid(z[:, :C])`` for EQL v2. Entries in [0, 1]; any float dtype (detached; the
            sums are accumulated in float64, so fp16/bf16 probabilities lose nothing more).
        labels: (N,) integer ground-truth classes in [0, C).

    Returns:
        (C, C+1) float64 tensor on ``class_probs``' device, without gradient: columns ``:C`` are
        S, column C is n. All zeros for N = 0 (the caller must still take part in the
        all-reduce).

    Raises:
        ValueError: if ``class_probs`` is not an (N, C) float tensor with C >= 1 and entries in
            [0, 1] (logits passed by mistake are caught here), or the labels are not (N,)
            integers in [0, C).
    """
    if not isinstance(class_probs, torch.Tensor) or class_probs.dim() != 2:
        raise ValueError(
            f"PCB class_probs must be an (N, C) tensor of foreground probabilities, got "
            f"{_shape(class_probs)}"
        )
    if not class_probs.is_floating_point():
        raise ValueError(f"PCB class_probs must be a float tensor, got {class_probs.dtype}")
    num_rows, num_classes = class_probs.shape
    if num_classes == 0:
        raise ValueError("PCB class_probs must have C >= 1 foreground columns, got 0")
    _check_labels(labels, num_rows, num_classes, "labels (foreground RoIs only)")
    with torch.no_grad():
        probs = class_probs.detach().to(torch.float64)
        # One pass for the range check (min and max propagate NaN, which then fails both
        # comparisons) instead of three elementwise passes and an all().
        if num_rows and not _within(probs, 0.0, 1.0):
            raise ValueError(
                "PCB class_probs must be probabilities in [0, 1] (softmax or sigmoid of the "
                "foreground logits, not the logits themselves), and not NaN"
            )
        stats = probs.new_zeros(num_classes, num_classes + 1)
        # One extra all-ones column turns the same index_add into the per-class counts.
        rows = torch.cat([probs, probs.new_ones(num_rows, 1)], dim=1)
        stats.index_add_(0, labels.to(device=probs.device, dtype=torch.long), rows)
        return stats


def pcb_ema_update(
    matrix: torch.Tensor,
    seen: torch.Tensor,
    statistics: torch.Tensor,
    momentum: float = 0.99,
    renormalize_rows: bool = True,
) -> None:
    """EMA update of the confusion matrix and the seen counter, in place (spec §2.1, Eq. 9).

    For every class i with ``n[i] > 0``: ``M[i] <- momentum * M[i] + (1 - momentum) * S[i] / n[i]``
    and then, with ``renormalize_rows`` (the code's CE and Seesaw variants), ``M[i] /= sum(M[i])``.
    Rows with ``n[i] = 0`` are left bit-identical: the reference fixed a bug where absent rows were
    decayed too. Finally ``seen += n``.

    Because M starts at zero, the first update of a row with re-normalisation sets it to exactly
    the batch mean, whatever the momentum (``(1 - m) p / sum((1 - m) p)``), so there is no zero-init
    bias. Afterwards re-normalisation only removes rounding drift (a convex combination of two
    distributions is a distribution). EQL v2's sigmoid rows are not distributions and are not
    re-normalised (``renormalize_rows=False``); they keep the zero-init bias ``1 - m^k``, as in the
    reference. A row whose updated sum is 0 (only possible with all-zero probabilities) is left
    un-normalised rather than turned into NaN.

    The update runs under ``torch.no_grad()`` on detached statistics: with a buffer that took part
    in an autograd graph, every iteration would chain onto the previous one's graph (a memory leak
    the reference only escapes because ``all_gather`` outputs are untracked). Only the rows of the
    present classes are computed (at most N per call, against C^2 entries at LVIS scale); picking
    them is the one host synchronisation besides the input check.

    Args:
        matrix: (C, C) float buffer M (float32 in the reference, kept so under AMP); updated in
            place. The EMA is computed in float64 and rounded once into the buffer.
        seen: (C,) float buffer of cumulative foreground counts (float64 recommended: float32
            counts stop being exact past 2^24 RoIs of a class); updated in place.
        statistics: (C, C+1) ``[S | n]`` from :func:`pcb_batch_statistics`, already summed over
            ranks. Finite, non-negative.
        momentum: gamma in [0, 1) (0.99 in the paper and code; see spec §8 on the number of
            updates per iteration). 0 replaces each present row by its batch mean.
        renormalize_rows: divide each updated row by its sum (CE / Seesaw: True; EQL v2: False).

    Raises:
        ValueError: on shape or dtype mismatches, non-finite or negative statistics, or a
            momentum outside [0, 1).
    """
    num_classes = _check_matrix(matrix)
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise ValueError(f"PCB momentum must be a real number in [0, 1), got {momentum!r}")
    gamma = float(momentum)
    if not (0.0 <= gamma < 1.0):  # also rejects NaN
        raise ValueError(
            f"PCB momentum must lie in [0, 1) (1 would never update the matrix), got {momentum!r}"
        )
    if not isinstance(seen, torch.Tensor) or seen.shape != (num_classes,):
        raise ValueError(
            f"PCB seen must be a ({num_classes},) tensor for a ({num_classes}, {num_classes}) "
            f"matrix, got {_shape(seen)}"
        )
    if not seen.is_floating_point():
        raise ValueError(f"PCB seen must be a float buffer (float64 recommended), got {seen.dtype}")
    if not isinstance(statistics, torch.Tensor) or statistics.shape != (
        num_classes,
        num_classes + 1,
    ):
        raise ValueError(
            f"PCB statistics must be ({num_classes}, {num_classes + 1}) [sums | counts] from "
            f"pcb_batch_statistics, got {_shape(statistics)}"
        )
    if not statistics.is_floating_point():
        raise ValueError(f"PCB statistics must be a float tensor, got {statistics.dtype}")

    with torch.no_grad():
        stats = statistics.detach().to(device=matrix.device, dtype=torch.float64)
        if not _within(stats, 0.0, torch.finfo(stats.dtype).max):  # one host sync
            raise ValueError(
                "PCB statistics must be finite and >= 0 (sums of probabilities and counts); "
                "check that they were all-reduced with SUM and not corrupted"
            )
        counts = stats[:, num_classes]
        # Every step below is row-wise, so computing the present rows alone gives the same bits
        # as the whole matrix; absent rows are never written and stay bit-identical. On CPU at
        # LVIS scale the C x C passes were most of PCB's per-iteration cost.
        rows = torch.nonzero(counts > 0).squeeze(1)
        mean = stats[rows, :num_classes] / counts[rows].clamp(min=1.0).unsqueeze(1)
        updated = gamma * matrix.detach()[rows].to(torch.float64) + (1.0 - gamma) * mean
        if renormalize_rows:
            row_sum = updated.sum(dim=1, keepdim=True)
            updated = torch.where(row_sum > 0, updated / row_sum.clamp(min=1e-300), updated)
        matrix.index_copy_(0, rows, updated.to(matrix.dtype))
        seen.add_(counts.to(device=seen.device, dtype=seen.dtype))


def pcb_fightback_targets(
    matrix: torch.Tensor,
    labels: torch.Tensor,
    normalize_columns: bool = True,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Fightback soft targets over the C foreground classes (spec §2.2, Eqs. 5 and 10).

    ``t = M_hat[:, y]`` with ``M_hat[i, j] = M[i, j] / max(sum_k M[k, j], eps)`` (CE / Seesaw), an
    estimate of ``P(gt = i | predicted j)``; each such t is >= 0 and sums to 1. With
    ``normalize_columns=False`` (EQL v2, where the paper drops Eq. 5) ``t = M[:, y]``, the raw
    column of the sigmoid matrix, which does not sum to 1.

    Only the N needed columns are gathered (N x C), and only the C column sums are computed: no
    normalised C x C copy (the reference clones the whole matrix every call). The eps clamp makes
    a column that is all zero (a class that no RoI has predicted yet, e.g. with the gate forced
    open while classes are unseen) give an all-zero, finite target instead of NaN. The result is
    detached: no gradient ever flows into M.

    Args:
        matrix: (C, C) confusion matrix M (read after this call's EMA update, as in the code).
        labels: (N,) integer classes in [0, C) of the foreground RoIs, in the order in which
            :func:`pcb_mixed_targets` will consume them.
        normalize_columns: column-normalise (CE / Seesaw) or use M as is (EQL v2).
        eps: lower clamp of the column sums, finite and > 0.

    Returns:
        (N, C) targets, float32 (float64 for a float64 matrix), on the matrix's device.

    Raises:
        ValueError: if the matrix is not square and float, the labels are not (N,) integers in
            [0, C), or eps is not finite and > 0.
    """
    num_classes = _check_matrix(matrix)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ValueError(f"PCB labels must be a 1-D (N,) integer tensor, got {_shape(labels)}")
    _check_labels(labels, labels.shape[0], num_classes, "labels (foreground RoIs only)")
    if (
        isinstance(eps, bool)
        or not isinstance(eps, numbers.Real)
        or not (math.isfinite(float(eps)) and float(eps) > 0)
    ):
        raise ValueError(f"PCB eps must be finite and > 0, got {eps!r}")
    dtype = torch.promote_types(matrix.dtype, torch.float32)
    with torch.no_grad():
        m = matrix.detach()
        index = labels.to(device=m.device, dtype=torch.long)
        # Column k of M as row k of the result, gathered row by row of M (contiguous reads;
        # gathering rows of M^T reads one float per cache line); nothing C x C is materialised.
        targets = m.index_select(1, index).t().contiguous().to(dtype)
        if normalize_columns:
            col_sums = m.sum(dim=0, dtype=torch.float64).clamp(min=float(eps))
            targets = targets / col_sums.index_select(0, index).to(dtype).unsqueeze(1)
        return targets


def pcb_mixed_targets(
    labels: torch.Tensor, fightback: torch.Tensor, alpha: float, num_classes: int
) -> torch.Tensor:
    """Soft labels over C+1 classes for all R RoIs (spec §2.3).

    Background rows (label C) are ``onehot(C)``; a foreground row of class y is
    ``(1 - alpha) onehot(y) + alpha [t ; 0]``, with t its fightback target. Because cross-entropy
    is linear in its target, the paper's ``(1 - a) CE + a L_PCB`` equals one CE against this q
    (the code's KL form differs only by the constant entropy of t). The zero on background means
    the PCB term also pushes the background logit of foreground RoIs down (code, not paper).

    ``alpha = 0`` gives bit-exactly the one-hot labels (``1 * 1 + 0 * t``), so the loss is the
    base loss (see :func:`soft_cross_entropy` for the last-bit caveat). With CE targets each row
    sums to 1 and ``q[C] = 0`` on foreground rows.

    Args:
        labels: (R,) integer labels in [0, C], C = background.
        fightback: (N, C) targets from :func:`pcb_fightback_targets`, one per foreground RoI
            (``labels < C``) in the order in which they appear in ``labels``.
        alpha: this step's weight a_r in [0, 1] (:func:`pcb_step_alphas`).
        num_classes: C, the number of foreground classes.

    Returns:
        (R, C+1) float32 soft labels on ``labels``' device, without gradient.

    Raises:
        ValueError: on bad shapes, labels outside [0, C], a fightback row count that does not
            match the number of foreground labels, or alpha outside [0, 1].
    """
    if isinstance(num_classes, bool):
        raise ValueError(f"PCB num_classes must be an integer >= 1, got {num_classes!r}")
    try:
        c = operator.index(num_classes)
    except TypeError as err:
        raise ValueError(f"PCB num_classes must be an integer >= 1, got {num_classes!r}") from err
    if c < 1:
        raise ValueError(f"PCB num_classes must be an integer >= 1, got {num_classes!r}")
    a = _check_alpha(alpha)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ValueError(f"PCB labels must be a 1-D (R,) integer tensor, got {_shape(labels)}")
    _check_labels(labels, labels.shape[0], c + 1, f"labels ({c} = background)")
    if not isinstance(fightback, torch.Tensor) or not fightback.is_floating_point():
        raise ValueError(
            f"PCB fightback must be an (N, {c}) float tensor from pcb_fightback_targets, got "
            f"{_shape(fightback)}"
        )
    labels = labels.long()
    fg = labels < c
    num_fg = int(fg.sum())
    if fightback.shape != (num_fg, c):
        raise ValueError(
            f"PCB fightback must be ({num_fg}, {c}): one row per foreground label (labels < {c}), "
            f"in order, got {tuple(fightback.shape)}"
        )
    with torch.no_grad():
        # The same 0/1 floats as one_hot(...).float(), without an (R, C+1) int64 intermediate.
        q = torch.zeros(labels.shape[0], c + 1, dtype=torch.float32, device=labels.device)
        q.scatter_(1, labels.unsqueeze(1), 1.0)
        if a > 0.0 and num_fg:
            t = fightback.detach().to(device=q.device, dtype=torch.float32)
            t = torch.cat([t, t.new_zeros(num_fg, 1)], dim=1)
            q[fg] = (1.0 - a) * q[fg] + a * t
        return q


def soft_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with soft labels, mean over RoIs (spec §2.3, the code's form).

    ``L = (1/R) sum_r -sum_k q[r, k] log_softmax(z[r])_k`` over *all* K logits, background
    included (the code appends a zero background entry to t and uses log-softmax over C+1; the
    paper's Eq. 10 uses the foreground-renormalised probabilities). R counts fg and bg RoIs, the
    divisor of Detectron2's mean cross-entropy and of mmdet's avg_factor. The targets are
    constants, so ``dL/dz = (softmax(z) * sum_k q_k - q) / R``, i.e. ``(softmax(z) - q) / R`` for
    targets that sum to 1.

    With one-hot targets this is plain cross-entropy: every per-RoI term is bit-identical to
    ``-log_softmax(z)[y]``, but the mean over RoIs can differ from ``F.cross_entropy`` in the last
    float32 bit (~1e-7 relative), because torch's NLL reduces the terms in another order. Callers
    that must reproduce the base loss bit for bit (gate closed, spec §7 inv. 6) should call the
    base loss itself, which is also cheaper.

    Args:
        logits: (R, K) raw logits (K = C+1 for the CE variant); fp16/bf16 are computed in
            float32.
        soft_targets: (R, K) non-negative, finite targets, e.g. from :func:`pcb_mixed_targets`
            (detached).

    Returns:
        Scalar loss in float32 (float64 for float64 logits). For R = 0 it is a zero that is still
        connected to ``logits``, so backward gives zero gradients instead of NaN.

    Raises:
        ValueError: if the logits are not an (R, K) float tensor with K >= 1, the targets do not
            have the same shape, or they are negative or not finite.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"PCB logits must be an (R, K) tensor with K >= 1, got {_shape(logits)}")
    if not logits.is_floating_point():
        raise ValueError(f"PCB logits must be a float tensor, got {logits.dtype}")
    if not isinstance(soft_targets, torch.Tensor) or soft_targets.shape != logits.shape:
        raise ValueError(
            f"PCB soft_targets must have the logits' shape {tuple(logits.shape)}, got "
            f"{_shape(soft_targets)}"
        )
    if not soft_targets.is_floating_point():
        raise ValueError(f"PCB soft_targets must be a float tensor, got {soft_targets.dtype}")
    # Half-precision logits are upcast: log-softmax over ~1200 logits loses too much in fp16, and
    # mmdet forces the loss to fp32 too.
    dtype = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(dtype)
    num_rois = z.shape[0]
    if num_rois == 0:
        return z.sum() * 0.0
    q = soft_targets.detach().to(device=z.device, dtype=dtype)
    if not _within(q, 0.0, torch.finfo(q.dtype).max):
        raise ValueError("PCB soft_targets must be finite and >= 0")
    return -(q * F.log_softmax(z, dim=1)).sum() / num_rois


def pcb_step_alphas(alpha: float, num_steps: int) -> Tuple[float, ...]:
    """PCB weight of each recurrent step of the iterative head (spec §2.4).

    ``a_r = alpha * r / (num_steps - 1)`` for r = 0 .. num_steps-1 (the paper's
    ``(r-1)/(R-1) alpha`` with 1-based r): the first step is never regularised and the last gets
    the full alpha. alpha 0.4 with 3 steps gives (0, 0.2, 0.4); Seesaw's 0.05 gives
    (0, 0.025, 0.05); EQL v2's 0.2 gives (0, 0.1, 0.2).

    ``num_steps = 1`` returns ``(alpha,)``: the "PCB only" ablation (Tab. 4, no iterative head),
    which the reference code cannot run (its formula divides by zero there); the paper does not
    say which alpha it used, so the full alpha on the single step is this module's choice.

    Args:
        alpha: the final PCB weight, in [0, 1].
        num_steps: R, the number of recurrent steps, an integer >= 1.

    Returns:
        Tuple of ``num_steps`` Python floats; the last one is exactly ``alpha``.

    Raises:
        ValueError: if alpha is outside [0, 1] or num_steps is not an integer >= 1.
    """
    a = _check_alpha(alpha)
    if isinstance(num_steps, bool):
        raise ValueError(f"PCB num_steps must be an integer >= 1, got {num_steps!r}")
    try:
        steps = operator.index(num_steps)
    except TypeError as err:
        raise ValueError(f"PCB num_steps must be an integer >= 1, got {num_steps!r}") from err
    if steps < 1:
        raise ValueError(f"PCB num_steps must be an integer >= 1, got {num_steps!r}")
    if steps == 1:
        return (a,)
    return tuple(a if r == steps - 1 else a * r / (steps - 1) for r in range(steps))


def pcb_active(
    iteration: int, start_iter: int, seen: torch.Tensor, require_all_seen: bool = True
) -> bool:
    """Whether the PCB regulariser is on for this iteration (spec §2.5).

    On iff ``iteration >= start_iter`` and, with ``require_all_seen`` (the reference's gate),
    every class has had at least one foreground RoI (``seen[i] > 0`` for all i). Gate on the
    trainer's iteration (``EventStorage.iter``, restored on resume) rather than a count of calls.
    The matrix is updated from the first iteration regardless; while the gate is closed the loss
    must be the base loss exactly.

    A single class that never gets a foreground RoI keeps the reference's gate closed for the
    whole run (LVIS subsets, toy data). ``require_all_seen=False`` opens it anyway; that is safe
    because :func:`pcb_fightback_targets` clamps the column sums, so unseen classes only remove
    mass and never produce NaN.

    Args:
        iteration: the current training iteration (integer).
        start_iter: first iteration at which PCB may be on (integer; e.g. the first LR step).
        seen: (C,) cumulative foreground counts (the buffer updated by :func:`pcb_ema_update`).
        require_all_seen: also require every class to have been seen.

    Returns:
        A Python bool (one host synchronisation on ``seen`` when the iteration gate is open).

    Raises:
        ValueError: if the iterations are not integers or ``seen`` is not a non-empty 1-D tensor.
    """
    its = []
    for name, value in (("iteration", iteration), ("start_iter", start_iter)):
        if isinstance(value, bool):
            raise ValueError(f"PCB {name} must be an integer, got {value!r}")
        try:
            its.append(operator.index(value))
        except TypeError as err:
            raise ValueError(f"PCB {name} must be an integer, got {value!r}") from err
    if not isinstance(seen, torch.Tensor) or seen.dim() != 1 or seen.numel() == 0:
        raise ValueError(f"PCB seen must be a non-empty 1-D (C,) tensor, got {_shape(seen)}")
    if its[0] < its[1]:
        return False
    if require_all_seen:
        return bool((seen > 0).all())
    return True


def pairwise_bias(matrix: torch.Tensor) -> float:
    """Pairwise-bias metric ``PwB(M) = ||M - M^T||_F`` (paper §4.1, spec §2.6).

    Zero for a symmetric matrix, where every pair of classes is confused equally in both
    directions. The paper reports it on a validation confusion matrix; on the training M it is a
    cheap diagnostic to log. Computed in float64.

    Args:
        matrix: (C, C) confusion matrix.

    Returns:
        The Frobenius norm as a Python float.

    Raises:
        ValueError: if the matrix is not a non-empty square float tensor.
    """
    _check_matrix(matrix)
    with torch.no_grad():
        m = matrix.detach().to(torch.float64)
        return float(torch.linalg.matrix_norm(m - m.t(), ord="fro"))
