"""Decoupled training (``MODEL.LONGTAIL.DECOUPLED``): stage 2 loads a trained stage-1 detector,
re-initialises some of its weights and trains only some parameters.

BAGS is trained this way (a softmax-CE detector first, then only a fresh grouped classifier); the
same two keys give classifier re-training (cRT) for any predictor.
"""
import logging
from typing import Iterable, List, Sequence

import torch
from detectron2.layers import FrozenBatchNorm2d

from .checkpoint import LongTailCheckpointer

logger = logging.getLogger(__name__)

__all__ = ["StageTwoCheckpointer", "check_prefixes", "train_only"]


def _matches(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def check_prefixes(names: Sequence[str], prefixes: Sequence[str], key: str) -> None:
    """Raise if a prefix of config ``key`` matches none of ``names`` (a typo would otherwise
    silently freeze or re-initialise nothing)."""
    for prefix in prefixes:
        if not any(_matches(n, [prefix]) for n in names):
            near = sorted({n.rsplit(".", 1)[0] for n in names if n.startswith(prefix.split(".")[0])})
            hint = f" Names under {prefix.split('.')[0]!r}: {', '.join(near[:8])}." if near else ""
            raise ValueError(
                f"{key} entry {prefix!r} matches no parameter or buffer of the model.{hint}"
            )


def train_only(model: torch.nn.Module, prefixes: Sequence[str]) -> List[str]:
    """Freeze every parameter whose name is not under one of ``prefixes``; return the names of
    those that still train.

    BatchNorm layers in the frozen part become :class:`FrozenBatchNorm2d` (same state-dict keys),
    so stage 2 uses the stage-1 running statistics instead of re-estimating them in train mode.
    """
    names = [n for n, _ in model.named_parameters()]
    check_prefixes(names, prefixes, "MODEL.LONGTAIL.DECOUPLED.TRAIN_ONLY")
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(_matches(name, prefixes))
        if param.requires_grad:
            trainable.append(name)
    _freeze_batchnorms(model)
    logger.info("Decoupled training: only these parameters train: %s", ", ".join(trainable))
    return trainable


def _freeze_batchnorms(module: torch.nn.Module) -> None:
    for name, child in module.named_children():
        is_bn = isinstance(child, torch.nn.modules.batchnorm._BatchNorm)
        if is_bn and not any(p.requires_grad for p in child.parameters()):
            setattr(module, name, FrozenBatchNorm2d.convert_frozen_batchnorm(child))
        else:
            _freeze_batchnorms(child)


class StageTwoCheckpointer(LongTailCheckpointer):
    """A :class:`LongTailCheckpointer` (safe loading; ``trust_checkpoint`` is passed on) that,
    when a run starts from ``MODEL.WEIGHTS`` (not on ``--resume``), leaves the weights under
    ``reinit`` prefixes at their fresh initialisation.

    Loading checks that the file really is a stage-1 detector: a parameter outside ``reinit``
    that the checkpoint lacks, or holds with another shape, is an error, because stage 2 would
    otherwise train on top of random (and frozen) features.
    """

    def __init__(self, model, save_dir: str = "", *, reinit: Sequence[str], **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.reinit = tuple(reinit)
        check_prefixes(list(self.model.state_dict()), self.reinit, "MODEL.LONGTAIL.DECOUPLED.REINIT")
        self._loading_stage_one = False

    def resume_or_load(self, path: str, *, resume: bool = True):
        if resume and self.has_checkpoint():
            # The stage-2 run's own checkpoint: everything in it is stage-2 state.
            return super().resume_or_load(path, resume=True)
        if not path:
            raise ValueError(
                "MODEL.LONGTAIL.DECOUPLED.REINIT is set, so this is a stage-2 run, but "
                "MODEL.WEIGHTS is empty. Train stage 1 first and pass its model_final.pth as "
                "MODEL.WEIGHTS."
            )
        self._loading_stage_one = True
        try:
            return self.load(path, checkpointables=[])
        finally:
            self._loading_stage_one = False

    def _load_model(self, checkpoint):
        if not self._loading_stage_one:
            return super()._load_model(checkpoint)
        weights = checkpoint["model"]
        for key in [k for k in weights if _matches(k.removeprefix("module."), self.reinit)]:
            del weights[key]
        incompatible = super()._load_model(checkpoint)
        model_state = self.model.state_dict()
        reinitialised = [k for k in model_state if _matches(k, self.reinit)]
        logger.info(
            "Re-initialised, not loaded from the stage-1 checkpoint (MODEL.LONGTAIL.DECOUPLED.REINIT): %s",
            ", ".join(f"{k} {tuple(model_state[k].shape)}" for k in reinitialised),
        )
        parameters = dict(self.model.named_parameters())
        missing = [k for k in incompatible.missing_keys if k in parameters and k not in reinitialised]
        reshaped = [k for k, *_ in incompatible.incorrect_shapes if not _matches(k, self.reinit)]
        if missing or reshaped:
            raise ValueError(
                "MODEL.WEIGHTS is not a stage-1 model of this architecture: "
                + (f"it lacks {len(missing)} parameters (e.g. {', '.join(missing[:4])}) " if missing else "")
                + (f"it holds other shapes for {', '.join(reshaped[:4])} " if reshaped else "")
                + "outside MODEL.LONGTAIL.DECOUPLED.REINIT. Pass the model_final.pth of a stage-1 "
                "run of the same model config, or add the keys to REINIT if they are meant to start fresh."
            )
        return incompatible
