"""Refusing NaN/inf before it reaches a method's buffers.

A method statistic that learns from the network's outputs (EQL v2's gradient sums, LDA's accuracy
window, PCB's confusion matrix) would keep a NaN forever once one got in: every later update adds
to it, and a checkpoint would save it. Each such update therefore follows the same three steps:

1. ``local = mark_non_finite(local, *inputs)``: this rank's statistics become all-NaN when any of
   the tensors they were computed from holds a NaN/inf (``argmax`` and saturated sigmoids can turn
   a NaN/inf input into finite-looking numbers, so the inputs are checked too);
2. ``total = all_reduce_sum(local)``: the one collective every rank already makes; a NaN on any
   rank makes the sum NaN on every rank;
3. ``check_finite_statistics(total, method=..., statistic=...)`` raises
   :class:`FloatingPointError` on every rank alike (so no rank goes on to wait for the others in
   the next collective), before the caller touches its buffers.

Label-only statistics (ECM's fg/bg RoI counts, Seesaw's class counts) cannot become non-finite
and do not need this.
"""

import torch
from detectron2.utils.events import get_event_storage

__all__ = ["check_finite_statistics", "current_iteration", "mark_non_finite"]


def current_iteration():
    """The iteration of detectron2's current event storage, or None outside of one."""
    try:
        return get_event_storage().iter
    except AssertionError:  # get_event_storage asserts that a storage is open
        return None


def mark_non_finite(local: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """``local`` unchanged if it and every tensor of ``inputs`` is finite, else a NaN tensor of the
    same shape, dtype and device (no host synchronisation).

    Args:
        local: floating statistics of this rank, about to be all-reduced with SUM.
        inputs: the tensors ``local`` was computed from (any device, any float dtype; empty
            tensors count as finite).
    """
    finite = torch.isfinite(local).all()
    for tensor in inputs:
        finite = finite & torch.isfinite(tensor.detach()).all().to(finite.device)
    return torch.where(finite, local, torch.full_like(local, float("nan")))


def check_finite_statistics(total: torch.Tensor, *, method: str, statistic: str) -> None:
    """Raise :class:`FloatingPointError` if ``total`` (statistics already summed over all ranks,
    passed through :func:`mark_non_finite` on each) holds a NaN/inf.

    Call it before any buffer is updated: the message says that the buffers were left as they
    were. Every rank sees the same ``total``, so every rank raises or none does.

    Args:
        total: the all-reduced statistics.
        method: the method, e.g. ``"EQLv2OutputLayers"`` (named first in the message).
        statistic: what was about to be updated, e.g. ``"gradient statistics
            eqlv2_pos_grad/eqlv2_neg_grad"``.
    """
    if bool(torch.isfinite(total).all()):  # one host synchronisation
        return
    iteration = current_iteration()
    when = (
        f"iteration {iteration}" if iteration is not None else "this call (no event storage open)"
    )
    raise FloatingPointError(
        f"{method}: non-finite {statistic} at {when}: the network's outputs they are computed "
        "from held NaN or inf on at least one rank. Training stops here; the method's buffers "
        "were left as they were, so no NaN/inf reached them or a checkpoint. A diverging run is "
        "the usual cause: lower SOLVER.BASE_LR or enable SOLVER.CLIP_GRADIENTS, then continue "
        "from the last checkpoint with --resume."
    )
