"""What each long-tail method costs over detectron2's softmax-CE box predictor, at LVIS scale.

    python -m longtail.tools.bench_heads [--stats STATS_JSON] [--threads 1] [--repeats 30]
        [--no-step] [--quick] [--out PREFIX [--overwrite]]

Every predictor is built the way a training run builds it (its LVIS v1 recipe leaf from
``configs/LVISv1/``, ``build_longtail_predictor``), on 1203 classes (the stats json decides),
1024-d box features and 2 x 512 sampled RoIs, 25 % foreground with labels drawn in proportion to
the classes' training instance counts, the rest background. Timed, per predictor:

* ``train``: forward + ``losses`` + backward (the gradient also flows into the box features, as
  in the model);
* ``loss only``: ``losses`` + backward from fixed predictions, i.e. without the two linear layers
  (at LVIS scale the class-specific box regression layer alone has 4 x 1203 outputs and the
  matrix products dominate ``train``; this column shows what the method's own code costs);
* ``predict_probs``: on predictions of the eval-mode forward.

PCB is not a predictor but a box branch: it is timed through ``LongTailROIHeads._forward_box``
(pooler, box head and predictor, 3 passes, the confusion-matrix EMA update, fightback targets)
against the same branch of the CE recipe, on FPN features of two images. Its update alone
(3 x confusion EMA update + fightback targets + mixed targets) is timed too, as a share of CE's
single predictor pass.

All cases run interleaved in one process (round robin, the start rotated every round) so that
load from other processes hits every method alike; the table gives medians, the ratio of
medians to CE, and the interquartile range of the per-round ratios. Unless ``--no-step``, a full
R50-FPN Mask R-CNN training step of the CE recipe is timed on CPU too, and each method's head
overhead is reported as ``(t_method - t_CE) / t_step``.

Class statistics: ``--stats``, an LVIS-style json (see ``longtail/data/class_stats.py``: an LVIS
annotation file or ``{"num_images", "categories": [{"id", "name", "image_count",
"instance_count"}]}``).
"""

import argparse
import dataclasses
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from ..config import add_longtail_config
from ..data.class_stats import ClassStats
from ..functional.pcb import pcb_mixed_targets
from ..modeling.predictors import build_longtail_predictor
from ..modeling.roi_heads import LongTailROIHeads
from .machine import cpu_model

logger = logging.getLogger(__name__)

__all__ = [
    "BenchSettings",
    "METHODS",
    "default_stats_path",
    "main",
    "render_markdown",
    "run_benchmark",
]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LVIS_CONFIGS = os.path.join(REPO, "configs", "LVISv1")
# Where the project's shared reference data lives next to a development checkout; a user's clone
# has none and must pass --stats.
DEFAULT_STATS = os.path.join(
    os.path.dirname(REPO), "shared", "data", "lvis_v1_train_category_stats.json"
)

#: The baseline every ratio is taken against.
BASELINE = "CE"
#: Targets of issue #8: a method's predictor at most 1.2x CE's, PCB's update at most 1.5x.
METHOD_TARGET = 1.2
PCB_TARGET = 1.5


@dataclasses.dataclass(frozen=True)
class Method:
    """One predictor row: the recipe leaf it is built from and config overrides on top."""

    name: str
    leaf: str
    opts: Tuple[str, ...] = ()


# The recipes of configs/LVISv1, so each method carries its own keys (classifier, scale, counts).
METHODS = (
    Method(BASELINE, "ce_mask_rcnn_R_50_FPN_1x.yaml"),
    Method("fed (sigmoid CE + fed)", "fed_mask_rcnn_R_50_FPN_1x.yaml"),
    Method(
        "SoftmaxCE",
        "ce_mask_rcnn_R_50_FPN_1x.yaml",
        ("MODEL.LONGTAIL.PREDICTOR", "SoftmaxCEOutputLayers"),
    ),
    Method("EQLv2", "eqlv2_mask_rcnn_R_50_FPN_1x.yaml"),
    Method("Seesaw", "seesaw_mask_rcnn_R_50_FPN_2x.yaml"),
    Method("BAGS", "bags_stage2_mask_rcnn_R_50_FPN_1x.yaml"),
    Method("ECM", "ecm_mask_rcnn_R_50_FPN_1x.yaml"),
    Method("IIF raw", "iif_raw_mask_rcnn_R_50_FPN_1x.yaml"),
    Method("IIF base10 cos", "iif_base10_iof_cos_mask_rcnn_R_50_FPN_2x.yaml"),
    Method("LDA", "lda_mask_rcnn_R_50_FPN_1x.yaml"),
)
# PCB's box branch and the CE branch it is compared with. START_ITER 0 and a filled pcb_seen open
# the regulariser, so the fightback targets and soft-label CE are part of what is timed.
CE_BRANCH = Method("CE box branch", "ce_mask_rcnn_R_50_FPN_1x.yaml")
PCB_BRANCH = Method(
    "PCB on CE box branch",
    "pcb_ce_mask_rcnn_R_50_FPN_2x.yaml",
    ("MODEL.LONGTAIL.PCB.START_ITER", "0"),
)
PCB_UPDATE = "PCB update (3 x EMA + fightback)"
FPN_LEVELS = (("p2", 4), ("p3", 8), ("p4", 16), ("p5", 32))


@dataclasses.dataclass
class BenchSettings:
    """What is measured. The defaults are the LVIS-scale benchmark of the docs."""

    rois_per_image: int = 512
    images: int = 2
    foreground_fraction: float = 0.25
    # (H, W) of the images: the FPN features of the PCB box branch and the full training step.
    image_size: Tuple[int, int] = (640, 800)
    repeats: int = 30
    warmup: int = 3
    # The PCB box branch costs seconds per call (3 box-head passes, RoIAlign backward); it joins
    # only the first branch_warmup + branch_repeats rounds.
    branch_repeats: int = 10
    branch_warmup: int = 1
    threads: int = 1
    step: bool = True
    step_iters: int = 5
    step_warmup: int = 1
    instances_per_image: int = 15
    pcb: bool = True
    seed: int = 0


def default_stats_path() -> Optional[str]:
    """The shared LVIS v1 train statistics of a development checkout, or None."""
    return DEFAULT_STATS if os.path.isfile(DEFAULT_STATS) else None


# ---- building ---------------------------------------------------------------------------------


def _cfg(method: Method, stats_path: str, stats: ClassStats):
    cfg = get_cfg()
    add_longtail_config(cfg)
    cfg.merge_from_file(os.path.join(LVIS_CONFIGS, method.leaf))
    cfg.merge_from_list(list(method.opts))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = stats.num_classes
    cfg.MODEL.LONGTAIL.CLASS_STATS_PATH = stats_path
    if (
        cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS
        and cfg.MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES >= stats.num_classes
    ):
        # Upstream samples FED_LOSS_NUM_CLASSES distinct classes: impossible with few classes.
        cfg.MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES = max(1, stats.num_classes // 2)
    return cfg


def _fed_weights(cfg, stats: ClassStats) -> Callable[[], torch.Tensor]:
    # Upstream's default reads the image counts of DATASETS.TRAIN's metadata; the same formula
    # (image_count ** power) from the stats json keeps the benchmark free of dataset files.
    power = cfg.MODEL.ROI_BOX_HEAD.FED_LOSS_FREQ_WEIGHT_POWER
    return lambda: torch.tensor(stats.image_count, dtype=torch.float32) ** power


def build_predictor(method: Method, stats_path: str, stats: ClassStats):
    cfg = _cfg(method, stats_path, stats)
    shape = ShapeSpec(channels=cfg.MODEL.ROI_BOX_HEAD.FC_DIM)
    overrides = (
        {"get_fed_loss_cls_weights": _fed_weights(cfg, stats)}
        if cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS
        else {}
    )
    return build_longtail_predictor(cfg, shape, **overrides).train()


def build_heads(method: Method, stats_path: str, stats: ClassStats) -> LongTailROIHeads:
    cfg = _cfg(method, stats_path, stats)
    channels = cfg.MODEL.FPN.OUT_CHANNELS
    shapes = {name: ShapeSpec(channels=channels, stride=stride) for name, stride in FPN_LEVELS}
    heads = LongTailROIHeads(cfg, shapes).train()
    if heads.pcb is not None:
        # Every class "seen": the regulariser's gate opens as it does late in a real run.
        heads.pcb.confusion.pcb_seen.fill_(1.0)
    return heads


# ---- inputs -----------------------------------------------------------------------------------


def sample_labels(
    stats: ClassStats, settings: BenchSettings, generator: torch.Generator
) -> List[torch.Tensor]:
    """Per image: the sampled RoIs' gt_classes, foreground first as detectron2's sampler orders
    them, foreground classes drawn in proportion to the training instance counts."""
    counts = torch.tensor(stats.instance_count, dtype=torch.float64).clamp(min=1.0)
    num_fg = int(round(settings.rois_per_image * settings.foreground_fraction))
    labels = []
    for _ in range(settings.images):
        fg = torch.multinomial(counts, num_fg, replacement=True, generator=generator)
        bg = torch.full((settings.rois_per_image - num_fg,), stats.num_classes, dtype=torch.long)
        labels.append(torch.cat([fg, bg]))
    return labels


def _random_boxes(n: int, size: Tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    h, w = size
    # Sides from 16 px to most of the image, so RoIs land on every FPN level.
    sides = 16 + torch.rand(n, 2, generator=generator) * torch.tensor([0.7 * w, 0.7 * h])
    x0 = torch.rand(n, generator=generator) * (w - sides[:, 0])
    y0 = torch.rand(n, generator=generator) * (h - sides[:, 1])
    return torch.stack([x0, y0, x0 + sides[:, 0], y0 + sides[:, 1]], dim=1)


def make_proposals(
    labels: Sequence[torch.Tensor], size: Tuple[int, int], generator: torch.Generator
):
    """Instances as the ROI heads' sampler returns them: proposal_boxes, gt_boxes, gt_classes."""
    proposals = []
    for image_labels in labels:
        n = image_labels.numel()
        inst = Instances(size)
        boxes = _random_boxes(n, size, generator)
        inst.proposal_boxes = Boxes(boxes)
        # A jittered copy: regression targets of the size a matched proposal has.
        inst.gt_boxes = Boxes(boxes + 8.0 * (torch.rand(n, 4, generator=generator) - 0.5))
        inst.gt_classes = image_labels.clone()
        proposals.append(inst)
    return proposals


def make_fpn_features(
    settings: BenchSettings, channels: int, generator: torch.Generator
) -> Dict[str, torch.Tensor]:
    h, w = settings.image_size
    return {
        name: torch.randn(
            settings.images, channels, -(-h // s), -(-w // s), generator=generator
        ).requires_grad_()
        for name, s in FPN_LEVELS
    }


# ---- timed cases ------------------------------------------------------------------------------


def _clear_grads(module: torch.nn.Module, *tensors: torch.Tensor) -> None:
    # Training mode (the probs case leaves its predictor in eval mode), and fresh .grad tensors
    # every call, so every case pays the same allocation, never accumulation.
    module.train()
    module.zero_grad(set_to_none=True)
    for t in tensors:
        t.grad = None


class Case:
    """A named callable timed once per round; ``prepare`` runs untimed before each call.
    ``warmup``/``repeats`` other than None limit it to the first ``warmup + repeats`` rounds."""

    def __init__(
        self, name: str, run: Callable[[], None], prepare: Callable[[], None] = lambda: None
    ):
        self.name, self.run, self.prepare = name, run, prepare
        self.samples: List[float] = []
        self.warmup: Optional[int] = None  # None: the benchmark's own
        self.repeats: Optional[int] = None

    def time_once(self) -> float:
        self.prepare()
        start = time.perf_counter()
        self.run()
        return time.perf_counter() - start


def _train_case(name, predictor, features, proposals) -> Case:
    def run():
        losses = predictor.losses(predictor(features), proposals)
        sum(losses.values()).backward()

    return Case(name, run, prepare=lambda: _clear_grads(predictor, features))


def _loss_case(name, predictor, features, proposals) -> Case:
    with torch.no_grad():
        fixed = [t.detach() for t in predictor(features)]
    inputs = [t.clone().requires_grad_() for t in fixed]

    def run():
        losses = predictor.losses(tuple(inputs), proposals)
        sum(losses.values()).backward()

    return Case(name, run, prepare=lambda: _clear_grads(predictor, *inputs))


def _probs_case(name, predictor, features, proposals) -> Case:
    # In eval mode, as at inference: a predictor's eval forward may lay out its scores
    # differently from its training forward (LDA applies h only to positives in training).
    predictor.eval()
    with torch.no_grad():
        predictions = predictor(features)
    predictor.train()

    def run():
        with torch.no_grad():
            predictor.predict_probs(predictions, proposals)

    return Case(name, run, prepare=predictor.eval)


def _branch_case(name, heads, fpn, proposals) -> Case:
    def run():
        losses = heads._forward_box(fpn, proposals)
        sum(losses.values()).backward()

    return Case(name, run, prepare=lambda: _clear_grads(heads, *fpn.values()))


def _pcb_update_case(heads, features, proposals) -> Case:
    """PCB's per-iteration bookkeeping without the passes: what ``PCBIterativeHead.losses`` does
    besides the base losses, on fixed logits (the calls are the project's own)."""
    pcb, predictor = heads.pcb, heads.box_predictor
    with torch.no_grad():
        scores = predictor(features)[0].detach()
    gt_classes = torch.cat([p.gt_classes for p in proposals])
    foreground = gt_classes < pcb.num_classes

    def run():
        for step in range(pcb.num_steps):
            fg_scores = scores[foreground]
            fg_probs = predictor.foreground_class_probs(fg_scores)
            pcb.confusion.update(fg_probs, gt_classes[foreground], logits=fg_scores)
            if pcb.alphas[step] > 0:
                fightback = pcb.confusion.fightback(gt_classes[foreground])
                pcb_mixed_targets(gt_classes, fightback, pcb.alphas[step], pcb.num_classes)

    return Case(PCB_UPDATE, run)


# ---- statistics -------------------------------------------------------------------------------


def _quantiles(values: Sequence[float]) -> Tuple[float, float, float]:
    """(q25, median, q75), linear interpolation; one value gives it three times."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]


def summarize(cases: Dict[str, Case], baseline: str) -> Dict[str, dict]:
    """Median time, IQR, ratio of medians to ``baseline`` and IQR of the per-round ratios."""
    base = cases[baseline].samples
    out = {}
    for name, case in cases.items():
        q25, med, q75 = _quantiles(case.samples)
        ratios = [t / b for t, b in zip(case.samples, base)]
        r25, _, r75 = _quantiles(ratios)
        out[name] = {
            "median_ms": 1e3 * med,
            "iqr_ms": [1e3 * q25, 1e3 * q75],
            "ratio": med / statistics.median(base),
            "ratio_iqr": [r25, r75],
            "samples_ms": [1e3 * t for t in case.samples],
        }
    return out


def interleave(cases: Sequence[Case], repeats: int, warmup: int) -> None:
    """Round robin over ``cases``; round i starts at case i mod n, so no case is always first
    (after the allocator settles) or always last. A case with its own ``warmup``/``repeats``
    takes part in the first ``warmup + repeats`` rounds only."""
    n = len(cases)
    for r in range(warmup + repeats):
        gc.collect()
        for k in range(n):
            case = cases[(r + k) % n]
            case_warmup = warmup if case.warmup is None else case.warmup
            case_repeats = repeats if case.repeats is None else case.repeats
            if r >= case_warmup + case_repeats:
                continue
            t = case.time_once()
            if r >= case_warmup:
                case.samples.append(t)
        if r >= warmup and (r - warmup + 1) % max(1, repeats // 5) == 0:
            logger.info("round %d/%d", r - warmup + 1, repeats)


# ---- the full training step -------------------------------------------------------------------


def time_training_step(stats_path: str, stats: ClassStats, settings: BenchSettings) -> dict:
    """Median seconds of one training step (forward, backward, SGD update) of the CE recipe's
    R50-FPN Mask R-CNN on synthetic images, random init, no pretrained weights."""
    from detectron2.modeling import build_model

    cfg = _cfg(METHODS[0], stats_path, stats)
    # The recipe's model as training builds it; only the batch is synthetic (already at its input
    # size: the model pads to a multiple of 32 but does not resize).
    model = build_model(cfg).train()
    # lr 0: the optimiser does a step's arithmetic without moving the weights. From random init
    # (no pretrained backbone, identity FrozenBN) a real update diverges within two steps.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(settings.seed + 1)
    h, w = settings.image_size
    counts = torch.tensor(stats.instance_count, dtype=torch.float64).clamp(min=1.0)
    batch = []
    for _ in range(settings.images):
        n = settings.instances_per_image
        boxes = _random_boxes(n, (h, w), g)
        masks = torch.zeros(n, h, w, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            masks[i, y0:y1, x0:x1] = True
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.multinomial(counts, n, replacement=True, generator=g)
        inst.gt_masks = BitMasks(masks)
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        batch.append({"image": image, "instances": inst, "height": h, "width": w})
    times = []
    with EventStorage(0):
        for i in range(settings.step_warmup + settings.step_iters):
            gc.collect()
            start = time.perf_counter()
            losses = model(batch)
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()
            t = time.perf_counter() - start
            if i >= settings.step_warmup:
                times.append(t)
                logger.info("training step %d/%d: %.2f s", len(times), settings.step_iters, t)
            else:
                logger.info("training step, warm-up: %.2f s", t)
    q25, med, q75 = _quantiles(times)
    return {
        "median_s": med,
        "iqr_s": [q25, q75],
        "samples_s": times,
        "image_size": [h, w],
        "images": settings.images,
        "instances_per_image": settings.instances_per_image,
    }


# ---- the benchmark ----------------------------------------------------------------------------


def machine_info(threads: int) -> dict:
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _load_average() -> Optional[List[float]]:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


class CpuShare:
    """How many cores *other* processes kept busy while a block ran: all CPU time of the machine
    (/proc/stat) minus this process's own, over the wall time. The load average cannot say that:
    it counts this process too and lags by minutes. None where /proc/stat does not exist."""

    def __enter__(self):
        self._start = self._snapshot()
        return self

    def __exit__(self, *exc):
        end = self._snapshot()
        self.other_cores = None
        if self._start is not None and end is not None:
            busy, own, wall = (e - s for e, s in zip(end, self._start))
            self.other_cores = max(0.0, (busy - own) / wall) if wall > 0 else None
        return False

    @staticmethod
    def _snapshot():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal ...: everything but idle and iowait.
        busy = sum(fields[:8]) - fields[3] - fields[4]
        own = os.times()
        return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.perf_counter()


def run_benchmark(stats_path: str, settings: BenchSettings) -> dict:
    """Build every case, time them interleaved, and return the results (json-ready)."""
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    stats = ClassStats.from_json(stats_path)
    logger.info(
        "%d classes from %s; %d threads", stats.num_classes, stats_path, torch.get_num_threads()
    )
    step, step_share = None, None
    if settings.step:
        # First, so that a step that cannot run fails in a minute rather than after the cases.
        logger.info("timing the full R50-FPN Mask R-CNN training step")
        with CpuShare() as share:
            step = time_training_step(stats_path, stats, settings)
        step_share = share.other_cores
    g = torch.Generator().manual_seed(settings.seed)
    labels = sample_labels(stats, settings, g)
    proposals = make_proposals(labels, settings.image_size, g)

    predictors = {}
    for method in METHODS:
        logger.info("building %s from %s", method.name, method.leaf)
        predictors[method.name] = build_predictor(method, stats_path, stats)
    dim = predictors[BASELINE].cls_score.in_features
    num_rois = sum(len(p) for p in proposals)
    features = torch.randn(num_rois, dim, generator=g).requires_grad_()

    train = [_train_case(name, p, features, proposals) for name, p in predictors.items()]
    loss = [_loss_case(name, p, features.detach(), proposals) for name, p in predictors.items()]
    probs = [_probs_case(name, p, features.detach(), proposals) for name, p in predictors.items()]
    branch = []
    if settings.pcb:
        logger.info("building the CE and PCB box branches")
        ce_heads = build_heads(CE_BRANCH, stats_path, stats)
        pcb_heads = build_heads(PCB_BRANCH, stats_path, stats)
        fpn = make_fpn_features(
            settings, _cfg(CE_BRANCH, stats_path, stats).MODEL.FPN.OUT_CHANNELS, g
        )
        branch = [
            _branch_case(CE_BRANCH.name, ce_heads, fpn, proposals),
            _branch_case(PCB_BRANCH.name, pcb_heads, fpn, proposals),
        ]
        for case in branch:
            case.warmup, case.repeats = settings.branch_warmup, settings.branch_repeats
        update = _pcb_update_case(pcb_heads, features.detach(), proposals)

    cases = train + loss + probs + branch + ([update] if settings.pcb else [])
    load_before = _load_average()
    logger.info(
        "timing %d cases x %d rounds (+%d warm-up)", len(cases), settings.repeats, settings.warmup
    )
    with EventStorage(0), CpuShare() as share:
        interleave(cases, settings.repeats, settings.warmup)
    load_after = _load_average()

    results = {
        "settings": dataclasses.asdict(settings),
        "stats_path": os.path.abspath(stats_path),
        "num_classes": stats.num_classes,
        "feature_dim": dim,
        "num_rois": num_rois,
        "num_foreground_rois": int(sum(int((lab < stats.num_classes).sum()) for lab in labels)),
        "machine": machine_info(torch.get_num_threads()),
        "load_average": {"before": load_before, "after": load_after},
        # Mean number of cores that other processes used while the cases were timed.
        "other_cores": {"cases": share.other_cores},
        "train": summarize({c.name: c for c in train}, BASELINE),
        "loss_only": summarize({c.name: c for c in loss}, BASELINE),
        "predict_probs": summarize({c.name: c for c in probs}, BASELINE),
    }
    if settings.pcb:
        results["pcb_branch"] = summarize({c.name: c for c in branch}, CE_BRANCH.name)
        # The update as a share of CE's single predictor pass: (t_CE + t_update) / t_CE.
        ce = results["train"][BASELINE]
        q25, med, q75 = _quantiles(update.samples)
        ce_samples = next(c for c in train if c.name == BASELINE).samples
        per_round = [(b + u) / b for u, b in zip(update.samples, ce_samples)]
        r25, _, r75 = _quantiles(per_round)
        results["pcb_update"] = {
            "median_ms": 1e3 * med,
            "iqr_ms": [1e3 * q25, 1e3 * q75],
            "ratio": (ce["median_ms"] + 1e3 * med) / ce["median_ms"],
            "ratio_iqr": [r25, r75],
            "samples_ms": [1e3 * t for t in update.samples],
        }
    if step is not None:
        results["step"] = step
        results["other_cores"]["step"] = step_share
        step_ms = 1e3 * step["median_s"]
        ce_ms = results["train"][BASELINE]["median_ms"]
        for row in results["train"].values():
            row["step_overhead"] = (row["median_ms"] - ce_ms) / step_ms
        if settings.pcb:
            branch_ce = results["pcb_branch"][CE_BRANCH.name]["median_ms"]
            for row in results["pcb_branch"].values():
                row["step_overhead"] = (row["median_ms"] - branch_ce) / step_ms
            results["pcb_update"]["step_overhead"] = results["pcb_update"]["median_ms"] / step_ms
    return results


# ---- output -----------------------------------------------------------------------------------


def _fmt_cores(other: dict) -> str:
    parts = [f"{v:.2f} cores ({k})" for k, v in other.items() if v is not None]
    return ", ".join(parts) if parts else "an unknown number of cores"


def _fmt_load(load) -> str:
    return "unknown" if load is None else " / ".join(f"{v:.2f}" for v in load)


def _fmt_ms(row) -> str:
    lo, hi = row["iqr_ms"]
    return f"{row['median_ms']:.1f} ({lo:.1f}-{hi:.1f})"


def _fmt_ratio(row, target: Optional[float]) -> str:
    lo, hi = row["ratio_iqr"]
    mark = "" if target is None else (" ok" if row["ratio"] <= target else " **over**")
    return f"{row['ratio']:.2f}x ({lo:.2f}-{hi:.2f}){mark}"


def _fmt_overhead(row) -> str:
    return "-" if "step_overhead" not in row else f"{100 * row['step_overhead']:+.2f} %"


def render_markdown(results: dict, command: str = "") -> str:
    """The results as markdown: the machine, the settings, the tables."""
    m, s = results["machine"], results["settings"]
    lines = [
        "## Box-predictor overhead",
        "",
        f"- machine: {m['cores']} cores, {m['cpu_model']}; torch {m['torch']}, "
        f"`torch.set_num_threads({m['torch_threads']})`",
        f"- other processes kept {_fmt_cores(results['other_cores'])} busy on average during "
        f"the measurement (machine CPU time minus this process's); load average before: "
        f"{_fmt_load(results['load_average']['before'])}, after: "
        f"{_fmt_load(results['load_average']['after'])}",
        f"- {results['num_classes']} classes ({os.path.basename(results['stats_path'])}), "
        f"{results['feature_dim']}-d box features, {results['num_rois']} RoIs "
        f"({s['images']} x {s['rois_per_image']}, {results['num_foreground_rois']} foreground)",
        f"- {s['repeats']} interleaved rounds after {s['warmup']} warm-up (PCB box branch: "
        f"{s['branch_repeats']} after {s['branch_warmup']}); median (IQR) in ms; "
        "ratio = median / CE's median (IQR of the per-round ratios)",
    ]
    if command:
        lines.append(f"- command: `{command}`")
    step = results.get("step")
    if step:
        lines.append(
            f"- training step (R50-FPN Mask R-CNN, CE recipe, {step['images']} images of "
            f"{step['image_size'][0]}x{step['image_size'][1]}, forward + backward + SGD): median "
            f"{step['median_s']:.2f} s over {len(step['samples_s'])} steps; overhead = "
            "(t_method - t_CE) / t_step"
        )
    lines += [
        "",
        "| method | train: fwd+loss+bwd ms | ratio vs CE (target <= 1.2x) | loss+bwd only ms | "
        "ratio vs CE | predict_probs ms | ratio vs CE | head overhead / step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in results["train"].items():
        loss, probs = results["loss_only"][name], results["predict_probs"][name]
        target = None if name == BASELINE else METHOD_TARGET
        lines.append(
            f"| {name} | {_fmt_ms(row)} | {_fmt_ratio(row, target)} | {_fmt_ms(loss)} | "
            f"{_fmt_ratio(loss, None)} | {_fmt_ms(probs)} | {_fmt_ratio(probs, None)} | "
            f"{_fmt_overhead(row)} |"
        )
    if "pcb_branch" in results:
        lines += [
            "",
            "PCB, through `LongTailROIHeads._forward_box` (pooler + box head + predictor; "
            "fwd+loss+bwd), regulariser on; the update row is 3 x (confusion EMA update + "
            "fightback + mixed targets), its ratio (t_CE + t_update) / t_CE against CE's single "
            "predictor pass above:",
            "",
            "| case | ms | ratio (target <= 1.5x) | overhead / step |",
            "| --- | --- | --- | --- |",
        ]
        for name, row in results["pcb_branch"].items():
            target = None if name == CE_BRANCH.name else PCB_TARGET
            lines.append(
                f"| {name} | {_fmt_ms(row)} | {_fmt_ratio(row, target)} | {_fmt_overhead(row)} |"
            )
        row = results["pcb_update"]
        lines.append(
            f"| {PCB_UPDATE} | {_fmt_ms(row)} | {_fmt_ratio(row, PCB_TARGET)} | "
            f"{_fmt_overhead(row)} |"
        )
    return "\n".join(lines) + "\n"


def _out_paths(prefix: str) -> Tuple[str, str]:
    stem, ext = os.path.splitext(prefix)
    if ext not in (".md", ".json"):
        stem = prefix
    return stem + ".md", stem + ".json"


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m longtail.tools.bench_heads",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--stats",
        default=None,
        help="LVIS-style class statistics json (an LVIS "
        "annotation file or longtail's class_stats.json); default: " + DEFAULT_STATS,
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed rounds (default 30; --quick: 3)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed rounds first (default 3; --quick: 1)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument(
        "--step-iters", type=int, default=None, help="timed training steps (default 5; --quick: 1)"
    )
    parser.add_argument("--no-step", action="store_true", help="skip the full-model training step")
    parser.add_argument("--no-pcb", action="store_true", help="skip the PCB box-branch cases")
    parser.add_argument(
        "--rois-per-image",
        type=int,
        default=None,
        help="sampled RoIs per image (default 512, detectron2's; --quick: 128)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="image size of the box-branch features and the training step "
        "(default 640 800; --quick: 512 640)",
    )
    parser.add_argument(
        "--branch-repeats",
        type=int,
        default=None,
        help="timed rounds of the PCB box-branch cases (default 10)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a rough check in about a minute, not "
        "LVIS scale: 2 x 128 RoIs, 3 rounds, 1 warm-up, 1 box-branch round, 1 "
        "training step at 512x640",
    )
    parser.add_argument("--out", default=None, help="write PREFIX.md and PREFIX.json")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --out files")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = argument_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    stats_path = args.stats or default_stats_path()
    if stats_path is None:
        sys.stderr.write(
            "bench_heads needs per-class training statistics: pass --stats PATH, an LVIS-style "
            "json such as the LVIS v1 train annotation file (lvis_v1_train.json) or the "
            "class_stats.json a training run writes (see longtail/data/class_stats.py for the "
            "formats).\n"
        )
        return 2
    if not os.path.isfile(stats_path):
        sys.stderr.write(f"bench_heads: --stats {stats_path!r} is not a file.\n")
        return 2
    outputs = _out_paths(args.out) if args.out else ()
    existing = [p for p in outputs if os.path.exists(p)]
    if existing and not args.overwrite:
        sys.stderr.write(
            f"bench_heads: {', '.join(existing)} exist; pass --overwrite to replace them.\n"
        )
        return 2
    settings = BenchSettings(
        threads=args.threads, step=not args.no_step, pcb=not args.no_pcb, seed=args.seed
    )
    if args.quick:
        settings.repeats, settings.warmup = 3, 1
        settings.branch_repeats, settings.branch_warmup = 1, 0
        settings.step_iters, settings.step_warmup = 1, 0
        settings.image_size = (512, 640)
        settings.rois_per_image = 128
    for key in ("repeats", "warmup", "branch_repeats", "step_iters", "rois_per_image"):
        if getattr(args, key) is not None:
            setattr(settings, key, getattr(args, key))
    if args.image_size is not None:
        settings.image_size = tuple(args.image_size)
    results = run_benchmark(stats_path, settings)
    command = "python -m longtail.tools.bench_heads " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    results["command"] = command.strip()
    markdown = render_markdown(results, results["command"])
    sys.stdout.write(markdown)
    if outputs:
        md_path, json_path = outputs
        os.makedirs(os.path.dirname(os.path.abspath(md_path)), exist_ok=True)
        with open(md_path, "w") as f:
            f.write(markdown)
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
        logger.info("wrote %s and %s", md_path, json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
