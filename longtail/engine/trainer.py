"""LongTailTrainer: detectron2's DefaultTrainer plus what the long-tail recipes need."""
import logging
import os
import weakref

import torch
from detectron2.data import DatasetMapper, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, create_ddp_model
from detectron2.engine.hooks import PeriodicWriter
from detectron2.engine.train_loop import TrainerBase
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from ..data import load_class_stats
from ..data.preflight import preflight_training_datasets
from ..data.robust_mapper import SkipCountingLoader, SkippedImagesHook, SkipUnreadableMapper
from ..evaluation import LongTailLVISEvaluator
from ..modeling.pcb_roi_heads import PCBIterativeHead
from ..modeling.predictors import ECMOutputLayers
from .checkpoint import LongTailCheckpointer
from .decoupled import StageTwoCheckpointer, train_only
from .guards import NonFiniteLossGuard, method_description
from .hooks import ECMBackgroundRatioHook, PCBConfusionHook

logger = logging.getLogger(__name__)

__all__ = ["LongTailTrainer", "check_output_dir"]

# Files whose presence means OUTPUT_DIR holds an earlier training run.
_RUN_MARKERS = ("last_checkpoint", "model_final.pth")


def check_output_dir(cfg, resume: bool) -> None:
    """Check that OUTPUT_DIR is writable and, unless ``resume``, holds no earlier training run.

    Called before anything is written to OUTPUT_DIR, so that a forgotten ``--resume`` or a reused
    directory never overwrites a user's checkpoints.
    """
    out = cfg.OUTPUT_DIR
    found = [m for m in _RUN_MARKERS if os.path.exists(os.path.join(out, m))]
    if found and not resume:
        raise FileExistsError(
            f"OUTPUT_DIR {out!r} already holds a training run ({', '.join(found)}). Pass --resume "
            "to continue it, or choose another OUTPUT_DIR to start a new run; nothing was "
            "overwritten."
        )
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise PermissionError(
            f"OUTPUT_DIR {out!r} cannot be written to ({e.strerror}). Choose a writable folder "
            "with OUTPUT_DIR <path>."
        ) from e


def _with_full_model_grad_clip(optimizer, max_norm: float, norm_type: float):
    """Clip the gradient norm over *all* parameters before each step (mmdetection's
    ``grad_clip=dict(max_norm=..., norm_type=...)``, which the papers' recipes use).

    detectron2's own CLIP_TYPE "norm" clips each parameter tensor separately, a different thing.
    The optimizer object is kept (only its class gains the clipping step), so schedulers and
    checkpoints see an ordinary optimizer.
    """
    base = type(optimizer)

    class FullModelGradClipOptimizer(base):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure)

    FullModelGradClipOptimizer.__name__ = f"FullModelGradClip{base.__name__}"
    optimizer.__class__ = FullModelGradClipOptimizer
    return optimizer


class LongTailTrainer(DefaultTrainer):
    """DefaultTrainer with the LVIS-style evaluator, class statistics, full-model gradient
    clipping, method hooks, and DDP that also runs on CPU (gloo) for ``--num-gpus N`` without GPUs.

    Repeat-factor sampling is detectron2's own ``RepeatFactorTrainingSampler``
    (``DATALOADER.SAMPLER_TRAIN``), used as is. The training data is checked before anything is
    built (``MODEL.LONGTAIL.DATA.PREFLIGHT``), and an unreadable image met during training is
    skipped and counted (``data/skipped_images``) up to ``MODEL.LONGTAIL.DATA.MAX_SKIPPED_FRACTION``
    (see longtail/data/robust_mapper.py).
    """

    def __init__(self, cfg, *, trust_checkpoint: bool = False):
        """
        Args:
            cfg: the config.
            trust_checkpoint: load MODEL.WEIGHTS and resumed checkpoints with detectron2's
                unrestricted unpickling (train_net.py's ``--trust-checkpoint``); by default only
                tensors and plain values are read (:class:`LongTailCheckpointer`).
        """
        # The construction order of DefaultTrainer.__init__, with one difference: detectron2's
        # create_ddp_model always passes device_ids=[local_rank], which DistributedDataParallel
        # rejects for CPU modules. There is no narrower seam to change that call.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        # A data mistake should cost minutes, not the hours until the loader meets it.
        loaded = preflight_training_datasets(cfg)
        # Every rank computes (or receives) the statistics before the model is built, because
        # predictors read them in from_config and the broadcast needs all ranks at once. They
        # count the dicts the preflight loaded rather than loading the datasets a second time.
        class_stats = load_class_stats(cfg, dataset_dicts=loaded)
        del loaded  # the train loader keeps its own (serialised) copy
        if comm.is_main_process():
            class_stats.to_json(os.path.join(cfg.OUTPUT_DIR, "class_stats.json"))

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = self.wrap_ddp(model)
        # A NaN/inf loss stops the run right after the forward pass, before backward and the
        # optimizer step, naming the iteration, the loss terms and the method.
        model.register_forward_hook(NonFiniteLossGuard(method_description(cfg)))
        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_cls(model, data_loader, optimizer)

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = self.build_checkpointer(
            cfg, model, trust_checkpoint=trust_checkpoint, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg):
        """The detector of cfg; for a decoupled stage 2 (``DECOUPLED.TRAIN_ONLY``) with all other
        parameters frozen."""
        model = super().build_model(cfg)
        if cfg.MODEL.LONGTAIL.DECOUPLED.TRAIN_ONLY:
            train_only(model, cfg.MODEL.LONGTAIL.DECOUPLED.TRAIN_ONLY)
        return model

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's train loader with its DatasetMapper, skipping and counting unreadable
        images (:class:`SkipUnreadableMapper`, :class:`SkipCountingLoader`)."""
        limit = cfg.MODEL.LONGTAIL.DATA.MAX_SKIPPED_FRACTION
        names = tuple(cfg.DATASETS.TRAIN)
        mapper = SkipUnreadableMapper(DatasetMapper(cfg, is_train=True), limit, dataset_names=names)
        loader = build_detection_train_loader(cfg, mapper=mapper)
        return SkipCountingLoader(loader, limit, dataset_names=names)

    @staticmethod
    def build_checkpointer(cfg, model, *, trust_checkpoint: bool = False, **checkpointables):
        """The training checkpointer, a :class:`LongTailCheckpointer` (files are read without
        arbitrary unpickling unless ``trust_checkpoint``); a decoupled stage 2
        (``DECOUPLED.REINIT``) loads its stage-1 weights through :class:`StageTwoCheckpointer`."""
        reinit = cfg.MODEL.LONGTAIL.DECOUPLED.REINIT
        if reinit:
            return StageTwoCheckpointer(model, cfg.OUTPUT_DIR, reinit=reinit,
                                        trust_checkpoint=trust_checkpoint, **checkpointables)
        return LongTailCheckpointer(model, cfg.OUTPUT_DIR, trust_checkpoint=trust_checkpoint,
                                    **checkpointables)

    @staticmethod
    def wrap_ddp(model):
        """DDP over all ranks; without device ids for a CPU model (gloo), as DDP requires."""
        if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
            return DistributedDataParallel(model, device_ids=None, broadcast_buffers=False)
        return create_ddp_model(model, broadcast_buffers=False)

    @classmethod
    def build_optimizer(cls, cfg, model):
        clip = cfg.SOLVER.CLIP_GRADIENTS
        if not (clip.ENABLED and clip.CLIP_TYPE == "full_model"):
            return super().build_optimizer(cfg, model)
        # Build the plain optimizer (upstream does not know "full_model"), then add the clipping.
        plain = cfg.clone()
        plain.defrost()
        plain.SOLVER.CLIP_GRADIENTS.ENABLED = False
        optimizer = super().build_optimizer(plain, model)
        return _with_full_model_grad_clip(optimizer, clip.CLIP_VALUE, clip.NORM_TYPE)

    def build_hooks(self):
        """detectron2's default hooks, then those of the long-tail method (see method_hooks)."""
        hooks = super().build_hooks()
        loader = self._trainer.data_loader
        if isinstance(loader, SkipCountingLoader):
            # before the writers, so that every metrics.json line has data/skipped_images
            at = next((i for i, h in enumerate(hooks) if isinstance(h, PeriodicWriter)), len(hooks))
            hooks.insert(at, SkippedImagesHook(loader))
        return hooks + self.method_hooks()

    def method_hooks(self):
        """Hooks the configured method needs during training (the baselines need none)."""
        hooks = []
        for module in self.model.modules():
            if isinstance(module, ECMOutputLayers) and module.measure_iters > 0:
                hooks.append(ECMBackgroundRatioHook(module, self.cfg.OUTPUT_DIR))
            if isinstance(module, PCBIterativeHead):
                hooks.append(PCBConfusionHook(
                    module, load_class_stats(self.cfg), self.cfg.OUTPUT_DIR,
                    self.cfg.MODEL.LONGTAIL.PCB.LOG_PERIOD, self.cfg.SOLVER.CHECKPOINT_PERIOD,
                ))
        return hooks

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        stats = load_class_stats(cfg)
        eval_cfg = cfg.MODEL.LONGTAIL.EVAL
        per_image = cfg.TEST.DETECTIONS_PER_IMAGE
        if eval_cfg.AP_FIXED and 0 <= per_image < eval_cfg.AP_FIXED_TOPK:
            logger.warning(
                "MODEL.LONGTAIL.EVAL.AP_FIXED with TEST.DETECTIONS_PER_IMAGE %d: inference keeps "
                "at most %d detections per image, so bbox_fixed/segm_fixed are a lower bound of "
                "AP^fixed (top %d per class). For the real AP^fixed run inference with "
                "TEST.DETECTIONS_PER_IMAGE -1 (no per-image cap; the standard AP still caps at "
                "300 per image in the evaluator).",
                per_image,
                per_image,
                eval_cfg.AP_FIXED_TOPK,
            )
        return LongTailLVISEvaluator(
            dataset_name,
            output_dir=output_folder,
            train_instance_count=stats.instance_count,
            train_image_count=stats.image_count,
            ap_fixed=eval_cfg.AP_FIXED,
            ap_fixed_topk=eval_cfg.AP_FIXED_TOPK,
            instance_bins=eval_cfg.INSTANCE_BINS,
        )
