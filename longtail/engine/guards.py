"""Stopping a training run at the first NaN/inf loss, before it reaches the weights.

detectron2's SimpleTrainer notices a non-finite total loss only in ``_write_metrics``: after the
backward pass, on the main rank only (the other ranks go on and wait in the next collective), only
every ``gather_metric_period`` iterations, and without saying which method was training.
:class:`NonFiniteLossGuard` is a forward hook on the trained model instead: it sees the loss dict
as soon as the model returns it, before ``backward()`` and ``optimizer.step()``.
"""

import math
from typing import Mapping

import torch
import torch.distributed as dist
from detectron2.utils import comm

from ..modeling.guards import current_iteration

__all__ = ["NonFiniteLossGuard", "check_losses_finite", "method_description"]


def method_description(cfg) -> str:
    """The configured method as the messages name it: ``MODEL.LONGTAIL.PREDICTOR``, plus
    ``" + PCB"`` when ``MODEL.LONGTAIL.PCB.ENABLED``."""
    method = cfg.MODEL.LONGTAIL.PREDICTOR
    return method + (" + PCB" if cfg.MODEL.LONGTAIL.PCB.ENABLED else "")


def check_losses_finite(loss_dict: Mapping[str, torch.Tensor], method: str) -> None:
    """Raise :class:`FloatingPointError` if any loss term is NaN/inf on any rank.

    In a multi-process run every rank takes part in one small all-reduce of per-term flags (the
    terms have the same names on every rank), so all ranks raise together instead of the healthy
    ones hanging in the backward pass's gradient all-reduce.
    """
    names = sorted(loss_dict)
    if not names:
        return
    values = [loss_dict[n].detach() for n in names]
    device = values[0].device
    flags = torch.stack([(~torch.isfinite(v)).any().to(device) for v in values]).to(torch.float32)
    if comm.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)
    bad = [n for n, flag in zip(names, flags.tolist()) if flag > 0]
    if not bad:
        return
    here = {n: float(loss_dict[n].detach().float().sum()) for n in bad}
    terms = ", ".join(
        f"{n} = {here[n]}" if not math.isfinite(here[n]) else f"{n} (non-finite on another rank)"
        for n in bad
    )
    iteration = current_iteration()
    where = f"iteration {iteration}" if iteration is not None else "a training step"
    raise FloatingPointError(
        f"Non-finite loss at {where} training {method}: {terms}. Training stops here, after "
        "the forward pass and before the backward pass and the optimizer step, so no weight or "
        "optimizer state was updated with it and no checkpoint holds it. A diverging run is the "
        "usual cause: lower SOLVER.BASE_LR or enable SOLVER.CLIP_GRADIENTS, then continue from the "
        "last checkpoint with --resume."
    )


class NonFiniteLossGuard:
    """A forward hook (``model.register_forward_hook(NonFiniteLossGuard(method))``) that checks
    the loss dict a detector returns in training mode with :func:`check_losses_finite`.

    Inference outputs (the model in eval mode, or anything but a dict) are left alone.
    """

    def __init__(self, method: str):
        self.method = method

    def __call__(self, module, inputs, output):
        if module.training and isinstance(output, Mapping):
            check_losses_finite(output, self.method)
