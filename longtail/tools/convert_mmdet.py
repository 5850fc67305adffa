"""Convert an mmdetection Mask R-CNN (or Faster R-CNN) R50/R101-FPN checkpoint into this project's
detectron2 layout, so that released models of the seed papers evaluate with ``train_net.py``::

    python -m longtail.tools.convert_mmdet IN.pth OUT.pth --config configs/released/X.yaml
    python train_net.py --config-file OUT.yaml --eval-only MODEL.WEIGHTS OUT.pth

``CONFIG`` describes the target model (method, classifier, number of classes, depth). The converter
builds that model on the CPU and fills every one of its parameters and buffers from the checkpoint,
shape-checked; it writes

* ``OUT.pth``: ``{"model": state_dict, "__author__": ..., "matching_heuristics": False}``, tensors
  only, which ``torch.load(weights_only=True)`` (and so ``LongTailCheckpointer``) reads;
* ``OUT.yaml``: ``_BASE_: CONFIG`` plus the keys that make detectron2 run the network the way
  mmdetection ran it (input format and normalisation, where the stride sits, RoIAlign flavour,
  anchor offset) and ``MODEL.WEIGHTS: OUT.pth``.

Source layouts (``--layout``, detected from the keys when not given):

* ``mmdet2`` (mmdetection 2.x and 3.x): ``roi_head.bbox_head.*`` / ``roi_head.mask_head.*``;
  background is the *last* classifier column (as in detectron2); class-specific regression and
  mask logits have one slot per foreground class. Heads: softmax (C+1), sigmoid with a background
  / objectness column (EQL v2, ECM: C+1), a plain sigmoid head (C, no background: a background
  column is appended for detectron2's ``USE_SIGMOID_CE`` head, which never reads it), Seesaw's
  C+2 ``[classes, object, background]`` (= ``SeesawOutputLayers``), cosine classifiers
  (mmdet ``NormedLinear`` / ``NormedConv2d`` hold plain ``weight``/``bias``, so the tensors are the
  same; the config picks ``MODEL.LONGTAIL.CLASSIFIER cosine`` / ``CosineMaskRCNNConvUpsampleHead``),
  PCB's iterative head (``roi_head.cls_sub_module`` / ``loc_sub_module`` -> ``roi_heads.pcb``).
* ``mmdet1`` (mmdetection 1.x, BAGS' v1.0rc0 fork): ``bbox_head.*`` / ``mask_head.*`` without the
  ``roi_head.`` prefix; background is classifier column *0*, and class-specific ``fc_reg`` (4(C+1)
  rows) and ``conv_logits`` (C+1 channels) carry a background slot first, which is removed. BAGS'
  grouped classifier (C + N + 2 logits ``[bg, fg | others_1, G_1 ... | ...]``, classes in ascending
  id inside a group) is the layout of ``BAGSOutputLayers`` column for column.

What the weights cannot tell, and how it is decided:

* Backbone style. mmdet's ``pytorch`` style puts the stride in the 3x3 conv
  (``MODEL.RESNETS.STRIDE_IN_1X1 False``), ``caffe`` in the 1x1; both have identical tensor names
  and shapes, so no check on the weights can tell them apart. ``--style`` decides; otherwise the
  checkpoint's own training config (``meta.config`` in 2.x / 1.x, ``meta.cfg`` in 3.x) when it has
  ``style=...``; otherwise ``pytorch``, the style of every released model of the seed papers (a
  warning says so).
* Input normalisation: mean/std/``to_rgb`` from the training config when present, else the
  style's mmdet default (pytorch: RGB, mean 123.675/116.28/103.53, std 58.395/57.12/57.375; caffe:
  BGR, mean 103.53/116.28/123.675, std 1). For RGB models the weights stay as they are and OUT.yaml
  sets ``INPUT.FORMAT RGB`` with the RGB mean/std, rather than permuting conv1's input channels to
  BGR: every tensor then stays bit-identical to the source (checkable by checksum), and
  ``INPUT.FORMAT`` is detectron2's documented switch for torchvision-style backbones, honoured by
  its data loader, demo and visualiser alike.
* RoIAlign: mmdet 2.x ``aligned=True`` -> ``ROIAlignV2`` (sampling ratio 0); mmdet 1.x
  ``aligned=False`` with ``sample_num=2`` -> ``ROIAlign`` with sampling ratio 2.
* Box coder: mmdet's target stds (0.1, 0.1, 0.2, 0.2) are detectron2's ``BBOX_REG_WEIGHTS``
  (10, 10, 5, 5) and the RPN's stds 1 are weights 1: both written explicitly.
* mmdet 1.x used the legacy "+1" box convention (width = x2 - x1 + 1 in box coding, IoU and
  anchors) and integer anchors centred at (stride - 1) / 2; detectron2 has no switch for "+1".
  OUT.yaml sets ``MODEL.ANCHOR_GENERATOR.OFFSET 0.5`` (anchor centres within half a pixel of
  mmdet 1.x's) and a header note states the remaining discrepancy; expect numbers within a few
  tenths of AP of the authors', not identical ones.

Every source key is either mapped, or dropped through the commented allow-list ``_DROPPABLE``
(or a ``--drop`` pattern), each drop logged; every model key is either filled from the
checkpoint or, through the commented allow-list ``_FILLED_FROM_MODEL``, keeps the value the model
computes from the config (class statistics, zero training statistics), each logged. Anything else
is an error that names the keys.
"""

import argparse
import logging
import math
import os
import pickle
import re
import sys
import tempfile
import textwrap
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..engine.checkpoint import ARRAY_PICKLE_GLOBALS

__all__ = [
    "ConversionError",
    "ConversionResult",
    "convert_checkpoint",
    "convert_state_dict",
    "detect_layout",
    "load_mmdet_checkpoint",
    "main",
]

logger = logging.getLogger(__name__)

LAYOUTS = ("mmdet1", "mmdet2")
STYLES = ("pytorch", "caffe")

# mmdetection's default normalisation per backbone style (configs/_base_ of 1.x and 2.x).
_STYLE_NORMALISATION = {
    "pytorch": dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True),
    "caffe": dict(mean=[103.53, 116.28, 123.675], std=[1.0, 1.0, 1.0], to_rgb=False),
}

# Checkpoint keys that may be left out of the converted model, with the reason logged for each.
_DROPPABLE = (
    # BatchNorm's step counter, read only by BatchNorm with momentum=None. The LVIS configs use
    # RESNETS.NORM FrozenBN, whose FrozenBatchNorm2d has no such buffer (with NORM BN the counter
    # is mapped like any other buffer).
    (
        re.compile(r"\.num_batches_tracked$"),
        "BatchNorm step counter, which the model's frozen " "norm layers do not have",
    ),
    # State of the classification-loss module: ECM's sample counts and weights
    # (sample_n, detection_cls_weight), EQL v2's ratio (pos_neg), PCB's epoch counter (_epoch),
    # ... Training state only. The statistics this project keeps in the predictor (Seesaw's counts,
    # EQL v2's gradient sums, PCB's confusion matrix) are mapped when the config's model has them;
    # everything else the predictor derives from the config's class statistics.
    (
        re.compile(r"^(roi_head\.)?bbox_head\.loss_cls\."),
        "training state of the classification "
        "loss; the converted predictor computes what it needs from the config",
    ),
)

# Model keys that no mmdet tensor fills, which keep the value the model built from the config
# gives them, with the reason logged for each.
_FILLED_FROM_MODEL = (
    # Functions of the class statistics of the config (MODEL.LONGTAIL.CLASS_STATS_PATH or
    # DATASETS.TRAIN): ECM's counts, r and margins, IIF's weights, BAGS' class -> group table. The
    # authors' code computed the same from the same LVIS train json.
    (
        re.compile(r"^roi_heads\.box_predictor\.(ecm_\w+|iif_weights|bags_partition)$"),
        "derived from the config's class statistics",
    ),
    # Training statistics that inference never reads; start from zero when the checkpoint has none.
    (
        re.compile(
            r"^roi_heads\.box_predictor\.(seesaw_cum_samples|eqlv2_pos_grad|eqlv2_neg_grad)$"
        ),
        "training statistic, not in the checkpoint: starts from zero",
    ),
    (
        re.compile(r"^roi_heads\.pcb\.confusion\.(pcb_cm|pcb_seen)$"),
        "training statistic, not in the checkpoint: starts from zero",
    ),
    # With RESNETS.NORM BN and a source without the counter.
    (re.compile(r"\.num_batches_tracked$"), "BatchNorm step counter: starts from zero"),
)

# Names mmdetection spells differently from detectron2's LVIS metadata. detectron2 names LVIS
# classes by their first synonym, mmdetection by the category `name` (they differ for LVIS v1 id
# 162, 'bull' / 'horned_cow', which the LVIS synonyms cover), and mmdetection corrected the LVIS
# typo 'speaker_(stero_equipment)'.
_CLASS_NAME_ALIASES = {"speaker_(stereo_equipment)": "speaker_(stero_equipment)"}

# A keyword a ConversionError message may end with, per key prefix: the config key that usually
# explains a key with no place / a key left unfilled.
_KEY_HINTS = (
    ("mask_head", "MODEL.MASK_ON and MODEL.ROI_MASK_HEAD.*"),
    ("pcb", "MODEL.LONGTAIL.PCB.ENABLED / MLP_LAYER_NORM"),
    ("cls_sub_module", "MODEL.LONGTAIL.PCB.ENABLED / MLP_LAYER_NORM"),
    ("loc_sub_module", "MODEL.LONGTAIL.PCB.ENABLED"),
    ("bottom_up.res", "MODEL.RESNETS.DEPTH"),
    ("backbone.layer", "MODEL.RESNETS.DEPTH"),
)

_MAX_LISTED = 20


class ConversionError(ValueError):
    """The checkpoint cannot be converted for this config; the message says why and what to do."""


@dataclass
class ConversionResult:
    """What :func:`convert_checkpoint` did.

    Attributes:
        state_dict: the converted model state, in the model's key order.
        overrides: dotted config keys written to OUT.yaml (besides ``_BASE_``).
        layout, style: the source layout and backbone style used.
        dropped: (source key, reason) of every checkpoint key left out.
        filled: (model key, reason) of every model key kept from the built model.
        notes: the discrepancies and assumptions written to OUT.yaml's header.
        out_path, yaml_path: the files written (None when not written).
    """

    state_dict: "OrderedDict[str, torch.Tensor]"
    overrides: Dict[str, object]
    layout: str
    style: str
    dropped: List[Tuple[str, str]] = field(default_factory=list)
    filled: List[Tuple[str, str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    out_path: Optional[str] = None
    yaml_path: Optional[str] = None


# ---------------------------------------------------------------------------------------------
# Reading the checkpoint without running code from it


class _Opaque:
    """Stands in for any object a checkpoint names that is not a tensor, a container or a number
    (mmengine's message hub, a ConfigDict, ...). It records what it was called with and never runs
    the named class's code."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self._args, self._state, self._items = args, None, {}

    def __setstate__(self, state):
        self._state = state

    def __setitem__(self, key, value):
        self._items[key] = value

    def append(self, value):
        self._items[len(self._items)] = value

    def extend(self, values):
        for value in values:
            self.append(value)

    def __repr__(self):
        return f"<opaque {type(self).__qualname__}>"


def _opaque_class(module: str, name: str):
    return type(f"{module}.{name}", (_Opaque,), {})


# The callables a restricted load may run: torch's own tensor rebuilders (what weights_only
# allows), numpy's array rebuilders and plain containers. Everything else becomes an _Opaque.
_SAFE_GLOBALS = ARRAY_PICKLE_GLOBALS | {
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("torch", "device"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytearray"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    replaced: set = set()

    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        _RestrictedUnpickler.replaced.add(f"{module}.{name}")
        return _opaque_class(module, name)


class _RestrictedPickleModule:
    """A ``pickle_module`` for ``torch.load`` whose unpickler builds only tensors, numpy arrays and
    plain values, and inert placeholders for anything else."""

    Unpickler = _RestrictedUnpickler

    @staticmethod
    def load(f, **kwargs):
        return _RestrictedUnpickler(f, **kwargs).load()


def _unwrap(obj, path):
    """(state_dict, meta, ignored top-level keys) of a loaded checkpoint."""
    if not isinstance(obj, dict):
        raise ConversionError(
            f"{path} holds a {type(obj).__name__}, not a dict: it is not an mmdetection "
            "checkpoint (expected {'state_dict': ..., 'meta': ...} or a plain state dict)."
        )
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    for container in ("state_dict", "model"):
        if isinstance(obj.get(container), dict):
            state = obj[container]
            ignored = sorted(str(k) for k in obj if k not in (container, "meta"))
            break
    else:
        state, ignored = obj, []
    bad = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(
            f"{path}: the state dict has {len(bad)} entries that are not tensors "
            f"({_listed(bad)}); is it an mmdetection model checkpoint?"
        )
    keys = list(state)
    # Saved from a DataParallel / DistributedDataParallel wrapper.
    if keys and all(k.startswith("module.") for k in keys):
        state = OrderedDict((k[len("module.") :], v) for k, v in state.items())
    return OrderedDict(state), meta, ignored


def load_mmdet_checkpoint(path: str):
    """Read an mmdetection checkpoint without running code from it.

    First ``torch.load(weights_only=True)``; files whose metadata holds other objects (mmengine's
    message hub in 3.x checkpoints, numpy arrays) are then read with an unpickler that builds only
    tensors, numpy arrays and plain containers and replaces every other object by an inert
    placeholder (logged), so no code named by the file runs.

    Returns:
        (state_dict, meta): an OrderedDict of tensors (``state_dict`` / ``model`` container
        unwrapped, a ``module.`` prefix removed) and the ``meta`` dict (empty if absent).

    Raises:
        ConversionError: if the file is missing, unreadable, or not a checkpoint.
    """
    if not os.path.isfile(path):
        raise ConversionError(f"Checkpoint {path} does not exist.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as first:
        reason = str(first).rsplit("WeightsUnpickler error: ", 1)[-1].strip()
        logger.info(
            "%s holds more than tensors and plain values (%s); reading it again with "
            "placeholders for those objects",
            path,
            reason,
        )
        _RestrictedUnpickler.replaced = set()
        try:
            obj = torch.load(path, map_location="cpu", pickle_module=_RestrictedPickleModule)
        except Exception as e:  # noqa: BLE001 - any failure means: not readable as a checkpoint
            raise ConversionError(f"Cannot read {path} as a torch checkpoint: {e}") from e
        if _RestrictedUnpickler.replaced:
            logger.info(
                "Objects of %s replaced by placeholders (not needed for the weights): %s",
                path,
                ", ".join(sorted(_RestrictedUnpickler.replaced)),
            )
    except Exception as e:  # noqa: BLE001 - a zip/format error; say which file
        raise ConversionError(f"Cannot read {path} as a torch checkpoint: {e}") from e
    state, meta, ignored = _unwrap(obj, path)
    if ignored:
        logger.info("Not part of the model, ignored: top-level entries %s of %s", ignored, path)
    return state, meta


def detect_layout(keys: Sequence[str]) -> str:
    """``"mmdet2"`` if the RoI heads sit under ``roi_head.``, ``"mmdet1"`` if ``bbox_head.`` is
    top-level; ConversionError if neither or both."""
    v2 = any(k.startswith("roi_head.") for k in keys)
    v1 = any(k.startswith(("bbox_head.", "mask_head.")) for k in keys)
    if v2 != v1:
        return "mmdet2" if v2 else "mmdet1"
    raise ConversionError(
        "Cannot tell the checkpoint's layout: it has "
        + (
            "both 'roi_head.*' and top-level 'bbox_head.*' keys"
            if v2
            else "neither 'roi_head.*' (mmdetection 2.x/3.x) nor top-level 'bbox_head.*' "
            "(mmdetection 1.x) keys"
        )
        + ". Pass --layout mmdet1 or --layout mmdet2 if you know it; only Mask/Faster R-CNN "
        "checkpoints are supported."
    )


# ---------------------------------------------------------------------------------------------
# The checkpoint's own training config (meta.config / meta.cfg), read with regular expressions


@dataclass
class _TrainingConfig:
    """Facts read from the checkpoint's training config text; None where it does not say."""

    present: bool = False
    style: Optional[str] = None
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    to_rgb: Optional[bool] = None
    normed_linear: Optional[bool] = None  # box classifier is NormedLinear
    linear_temperature: Optional[float] = None
    normed_conv: Optional[bool] = None  # mask logits are NormedConv2d
    conv_temperature: Optional[float] = None
    mask_threshold: Optional[float] = None


def _one(values, what):
    distinct = sorted(set(values), key=str)
    if len(distinct) > 1:
        logger.warning(
            "The checkpoint's training config names several %s (%s); not using it.", what, distinct
        )
        return None
    return distinct[0] if distinct else None


def _floats(text):
    return tuple(float(v) for v in re.split(r"[,\s]+", text.strip()) if v)


def _read_training_config(meta) -> _TrainingConfig:
    text = meta.get("config", meta.get("cfg"))
    if not isinstance(text, str) or not text.strip():
        return _TrainingConfig()
    info = _TrainingConfig(present=True)
    info.style = _one(re.findall(r"\bstyle\s*=\s*['\"](\w+)['\"]", text), "backbone styles")
    mean = _one([_floats(m) for m in re.findall(r"\bmean\s*=\s*\[([^\]]*)\]", text)], "means")
    std = _one([_floats(m) for m in re.findall(r"\bstd\s*=\s*\[([^\]]*)\]", text)], "stds")
    info.mean = list(mean) if mean else None
    info.std = list(std) if std else None
    rgb = re.findall(r"\b(?:to_rgb|bgr_to_rgb)\s*=\s*(True|False)", text)
    rgb = _one(rgb, "channel orders")
    info.to_rgb = None if rgb is None else rgb == "True"
    if re.search(r"\bbbox_head\s*=", text):
        # mmdet's keyword is misspelt 'tempearture'; its default is 20.
        linear = re.findall(r"dict\(([^()]*['\"]NormedLinear['\"][^()]*)\)", text)
        info.normed_linear = bool(linear)
        temps = [_temperature(d) for d in linear]
        info.linear_temperature = _one(temps, "NormedLinear temperatures") if temps else None
    if re.search(r"\bmask_head\s*=", text):
        conv = re.findall(r"dict\(([^()]*['\"]NormedConv2d['\"][^()]*)\)", text)
        info.normed_conv = bool(conv)
        temps = [_temperature(d) for d in conv]
        info.conv_temperature = _one(temps, "NormedConv2d temperatures") if temps else None
    thr = re.findall(r"\bmask_thr_binary\s*=\s*([0-9.]+)", text)
    thr = _one([float(t) for t in thr], "mask thresholds")
    info.mask_threshold = thr
    return info


def _temperature(args: str) -> float:
    m = re.search(r"\b(?:tempearture|temperature)\s*=\s*([0-9.]+)", args)
    return float(m.group(1)) if m else 20.0


def _checkpoint_classes(meta) -> Optional[List[str]]:
    """Class names of mmdet 2.x (``meta.CLASSES``) or 3.x (``meta.dataset_meta.classes``)."""
    dataset_meta = meta.get("dataset_meta")
    for names in (
        meta.get("CLASSES"),
        dataset_meta.get("classes") if isinstance(dataset_meta, dict) else None,
        meta.get("classes"),
    ):
        if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
            return list(names)
    return None


# ---------------------------------------------------------------------------------------------
# Key mapping


@dataclass
class _Mapped:
    """A source tensor converted to the model's layout, in the checkpoint's class order.

    ``class_axes``: (dim, block) pairs along which the first C * block entries are per-class
    blocks of ``block`` entries (class reordering permutes them; the rest is kept).
    """

    source: str
    target: str
    tensor: torch.Tensor
    class_axes: Tuple[Tuple[int, int], ...] = ()


@dataclass
class _NoPlace:
    """A recognised source key whose model key (``target``) the config's model does not have."""

    target: str


_ERROR = object()  # the key's tensor does not fit; the problem has been recorded

_BN_PARAMS = r"(weight|bias|running_mean|running_var|num_batches_tracked)"


def _plain_rules():
    """(regex, target template) of the tensors that are only renamed: backbone, FPN, RPN."""

    def res(m, tail):
        return f"backbone.bottom_up.res{int(m.group(1)) + 1}.{m.group(2)}.{tail}"

    return (
        (r"^backbone\.conv1\.weight$", lambda m: "backbone.bottom_up.stem.conv1.weight"),
        (
            rf"^backbone\.bn1\.{_BN_PARAMS}$",
            lambda m: f"backbone.bottom_up.stem.conv1.norm.{m.group(1)}",
        ),
        (
            r"^backbone\.layer(\d)\.(\d+)\.conv(\d)\.weight$",
            lambda m: res(m, f"conv{m.group(3)}.weight"),
        ),
        (
            rf"^backbone\.layer(\d)\.(\d+)\.bn(\d)\.{_BN_PARAMS}$",
            lambda m: res(m, f"conv{m.group(3)}.norm.{m.group(4)}"),
        ),
        (
            r"^backbone\.layer(\d)\.(\d+)\.downsample\.0\.weight$",
            lambda m: res(m, "shortcut.weight"),
        ),
        (
            rf"^backbone\.layer(\d)\.(\d+)\.downsample\.1\.{_BN_PARAMS}$",
            lambda m: res(m, f"shortcut.norm.{m.group(3)}"),
        ),
        # FPN: level i of mmdet's lists is detectron2's p{i+2}.
        (
            r"^neck\.lateral_convs\.(\d)\.conv\.(weight|bias)$",
            lambda m: f"backbone.fpn_lateral{int(m.group(1)) + 2}.{m.group(2)}",
        ),
        (
            r"^neck\.fpn_convs\.(\d)\.conv\.(weight|bias)$",
            lambda m: f"backbone.fpn_output{int(m.group(1)) + 2}.{m.group(2)}",
        ),
        # Same anchor order (aspect ratio major, one size per level) and delta order (a * 4 + k).
        (
            r"^rpn_head\.rpn_conv\.(weight|bias)$",
            lambda m: f"proposal_generator.rpn_head.conv.{m.group(1)}",
        ),
        (
            r"^rpn_head\.rpn_cls\.(weight|bias)$",
            lambda m: f"proposal_generator.rpn_head.objectness_logits.{m.group(1)}",
        ),
        (
            r"^rpn_head\.rpn_reg\.(weight|bias)$",
            lambda m: f"proposal_generator.rpn_head.anchor_deltas.{m.group(1)}",
        ),
    )


def _head_rules(roi: str):
    """(regex, kind, target template) of the RoI heads; ``roi`` is 'roi_head.' or ''."""
    p = re.escape(roi)
    return (
        (
            rf"^{p}bbox_head\.shared_fcs\.(\d)\.(weight|bias)$",
            "plain",
            lambda m: f"roi_heads.box_head.fc{int(m.group(1)) + 1}.{m.group(2)}",
        ),
        (
            rf"^{p}bbox_head\.fc_cls\.(weight|bias)$",
            "cls",
            lambda m: f"roi_heads.box_predictor.cls_score.{m.group(1)}",
        ),
        (
            rf"^{p}bbox_head\.fc_reg\.(weight|bias)$",
            "reg",
            lambda m: f"roi_heads.box_predictor.bbox_pred.{m.group(1)}",
        ),
        (
            rf"^{p}mask_head\.convs\.(\d)\.conv\.(weight|bias)$",
            "plain",
            lambda m: f"roi_heads.mask_head.mask_fcn{int(m.group(1)) + 1}.{m.group(2)}",
        ),
        (
            rf"^{p}mask_head\.upsample\.(weight|bias)$",
            "plain",
            lambda m: f"roi_heads.mask_head.deconv.{m.group(1)}",
        ),
        (
            rf"^{p}mask_head\.conv_logits\.(weight|bias)$",
            "mask",
            lambda m: f"roi_heads.mask_head.predictor.{m.group(1)}",
        ),
        # PCB's IterativeRoIHead (mmdet 2.16 fork): MLP(layers=Sequential(fc1, relu1, fc2)) with an
        # optional layer_norm before it; ours are Sequential([LayerNorm,] Linear, ReLU, Linear).
        (rf"^{p}cls_sub_module\.layers\.fc(\d)\.(weight|bias)$", "pcb_cls", None),
        (rf"^{p}cls_sub_module\.layer_norm\.(weight|bias)$", "pcb_norm", None),
        (rf"^{p}loc_sub_module\.layers\.fc(\d)\.(weight|bias)$", "pcb_loc", None),
        # Loss statistics with an equivalent predictor buffer; dropped when the model lacks it.
        (
            rf"^{p}bbox_head\.loss_cls\.cum_samples$",
            "stat",
            lambda m: "roi_heads.box_predictor.seesaw_cum_samples",
        ),
        (
            rf"^{p}bbox_head\.loss_cls\.(pos|neg)_grad$",
            "stat",
            lambda m: f"roi_heads.box_predictor.eqlv2_{m.group(1)}_grad",
        ),
        (
            rf"^{p}bbox_head\.loss_cls\.fg_confusion_matrix$",
            "stat",
            lambda m: "roi_heads.pcb.confusion.pcb_cm",
        ),
        (
            rf"^{p}bbox_head\.loss_cls\.num_inst_cnt$",
            "stat",
            lambda m: "roi_heads.pcb.confusion.pcb_seen",
        ),
    )


def _classifier_kind(model) -> str:
    """How the model's box classifier columns are laid out (see the module docstring)."""
    from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

    from ..modeling.predictors import (
        BAGSOutputLayers,
        ECMOutputLayers,
        EQLv2OutputLayers,
        SeesawOutputLayers,
        SoftmaxCEOutputLayers,
        IIFOutputLayers,
    )

    predictor = model.roi_heads.box_predictor
    if isinstance(predictor, BAGSOutputLayers):
        return "bags"
    if isinstance(predictor, SeesawOutputLayers):
        return "seesaw"
    if isinstance(predictor, (EQLv2OutputLayers, ECMOutputLayers)):
        return "sigmoid_bg"  # C+1 sigmoid columns, the last one a trained background task
    if type(predictor) is FastRCNNOutputLayers:
        # detectron2's sigmoid head has C+1 columns of which it never reads the last.
        return "sigmoid" if predictor.use_sigmoid_ce else "softmax"
    if isinstance(predictor, (SoftmaxCEOutputLayers, IIFOutputLayers)):
        return "softmax"
    return "unsupported"  # e.g. LDA's four heads (g, h', h, p): no mmdetection counterpart


def _pcb_indices(target_state, module: str):
    """(linear indices, norm indices) of ``roi_heads.pcb.<module>`` in the model."""
    prefix = f"roi_heads.pcb.{module}."
    found = sorted(
        {int(k[len(prefix) :].split(".")[0]) for k in target_state if k.startswith(prefix)}
    )
    linear = [i for i in found if target_state[f"{prefix}{i}.weight"].dim() == 2]
    norm = [i for i in found if target_state[f"{prefix}{i}.weight"].dim() == 1]
    return linear, norm


class _Converter:
    """Maps every source key onto the model's keys, recording what does not fit."""

    def __init__(
        self, source, target_state, layout, classifier_kind, predictor_name, num_classes, drop=()
    ):
        self.source = source
        self.target = target_state
        self.layout = layout
        self.kind = classifier_kind
        self.predictor_name = predictor_name
        self.C = num_classes
        self.extra_drop = [re.compile(p) for p in drop]
        self.plain = [(re.compile(p), f) for p, f in _plain_rules()]
        roi = "roi_head." if layout == "mmdet2" else ""
        self.heads = [(re.compile(p), kind, f) for p, kind, f in _head_rules(roi)]
        self.unmapped: List[str] = []  # source keys with no place in the model
        self.errors: List[str] = []  # tensors that do not fit
        self.dropped: List[Tuple[str, str]] = []
        self.failed_targets = set()  # model keys whose source tensor did not fit

    # -- per-kind transforms: from the source layout to detectron2's, in the checkpoint's class
    #    order; each returns a _Mapped, or None after recording the problem

    def _cls(self, key, target, t):
        rows, C = t.shape[0], self.C
        if self.kind == "unsupported":
            self.errors.append(
                f"{key}: converting into {self.predictor_name} is not supported "
                "(no mmdetection head has its logit layout)"
            )
            return None
        if self.kind == "bags":
            if self.layout != "mmdet1":
                self.errors.append(
                    f"{key}: BAGS is converted from the authors' mmdetection 1.x fork only; "
                    "mmdetection 2.x ports (e.g. tztztztztz/eqlv2's group softmax) order the "
                    "groups differently, so their columns would land on the wrong classes"
                )
                return None
            # The authors' pred_slice / label2binlabel layout is BAGSOutputLayers' (G0 = [bg, fg],
            # then [others_n, classes of G_n by ascending id]); the group sizes must agree, which
            # the shape check sees through K = C + N + 2.
            return _Mapped(key, target, t)
        if self.kind == "seesaw":
            if self.layout != "mmdet2" or rows != C + 2:
                self.errors.append(
                    f"{key}: {rows} classifier outputs, but SeesawOutputLayers takes mmdetection "
                    f"2.x's C + 2 = {C + 2} ([classes, object, background])"
                )
                return None
            return _Mapped(key, target, t, ((0, 1),))
        if rows == C + 1 and self.kind != "sigmoid":
            if self.layout == "mmdet1":
                t = torch.cat([t[1:], t[:1]], dim=0)  # background first (mmdet 1.x) -> last
            return _Mapped(key, target, t, ((0, 1),))
        if rows == C and self.kind == "sigmoid":
            # A sigmoid head without background column (mmdet use_sigmoid=True). detectron2's
            # sigmoid head has C+1 outputs and never reads the last one (neither its loss nor its
            # inference), so a zero column is appended.
            pad = torch.zeros((1,) + tuple(t.shape[1:]), dtype=t.dtype)
            return _Mapped(key, target, torch.cat([t, pad], dim=0), ((0, 1),))
        if self.kind == "sigmoid":
            hint = (
                f"; C + 1 outputs come from a softmax head or a head with an objectness column "
                "(EQLv2OutputLayers / ECMOutputLayers): set the matching "
                "MODEL.LONGTAIL.PREDICTOR"
                if rows == C + 1
                else ""
            )
            self.errors.append(
                f"{key}: {rows} classifier outputs; detectron2's sigmoid head "
                f"(USE_SIGMOID_CE) takes C = {C}{hint}"
            )
            return None
        hint = (
            "; C outputs are a sigmoid head without background column: set "
            "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE True with the stock FastRCNNOutputLayers"
            if rows == C
            else ""
        )
        self.errors.append(
            f"{key}: {rows} classifier outputs; {self.predictor_name} over C = {C} "
            f"classes takes C + 1 = {C + 1}{hint}"
        )
        return None

    def _reg(self, key, target, t):
        rows, C = t.shape[0], self.C
        if rows == 4:
            return _Mapped(key, target, t)
        if self.layout == "mmdet1" and rows == 4 * (C + 1):
            return _Mapped(key, target, t[4:], ((0, 4),))  # the background slot comes first
        if self.layout == "mmdet2" and rows == 4 * C:
            return _Mapped(key, target, t, ((0, 4),))
        expect = 4 * (C + 1) if self.layout == "mmdet1" else 4 * C
        self.errors.append(
            f"{key}: {rows} regression outputs; class-specific regression over C = {C} classes "
            f"has {expect} in the {self.layout} layout, class-agnostic 4 "
            "(MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG)"
        )
        return None

    def _mask(self, key, target, t):
        channels, C = t.shape[0], self.C
        if channels == 1:
            return _Mapped(key, target, t)
        if self.layout == "mmdet1" and channels == C + 1:
            return _Mapped(key, target, t[1:], ((0, 1),))  # the background slot comes first
        if channels == C:
            return _Mapped(key, target, t, ((0, 1),))
        self.errors.append(
            f"{key}: {channels} mask logit channels; C = {C} classes take {C}"
            + (f" (or {C + 1} with mmdet 1.x's background slot)" if self.layout == "mmdet1" else "")
            + ", class-agnostic masks 1 (MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK)"
        )
        return None

    def _pcb(self, key, kind, m, t):
        if kind == "pcb_norm":
            _, norm = _pcb_indices(self.target, "cls_modulation")
            if not norm:
                return _NoPlace("a LayerNorm in roi_heads.pcb.cls_modulation")
            axes = () if self.kind == "bags" else ((0, 1),)
            return _Mapped(key, f"roi_heads.pcb.cls_modulation.{norm[0]}.{m.group(1)}", t, axes)
        module = "cls_modulation" if kind == "pcb_cls" else "box_modulation"
        linear, _ = _pcb_indices(self.target, module)
        layer = int(m.group(1)) - 1
        if layer >= len(linear):
            return _NoPlace(f"linear layer {layer + 1} of roi_heads.pcb.{module}")
        axes = ()
        if layer == 0 and m.group(2) == "weight":
            # The first layer reads the logits (cls) or the class-specific deltas (loc).
            axes = ((1, 4),) if kind == "pcb_loc" else (() if self.kind == "bags" else ((1, 1),))
        return _Mapped(key, f"roi_heads.pcb.{module}.{linear[layer]}.{m.group(2)}", t, axes)

    # -- driver

    def _map_one(self, key, t):
        """A _Mapped, _ERROR, a _NoPlace, or None for a key no rule knows."""
        for pattern, name in self.plain:
            m = pattern.match(key)
            if m:
                target = name(m)
                return _Mapped(key, target, t) if target in self.target else _NoPlace(target)
        for pattern, kind, name in self.heads:
            m = pattern.match(key)
            if not m:
                continue
            if kind.startswith("pcb_"):
                return self._pcb(key, kind, m, t)
            target = name(m)
            if target not in self.target:
                return _NoPlace(target)
            if kind == "stat":
                axes = ((0, 1), (1, 1)) if target.endswith("pcb_cm") else ((0, 1),)
                return _Mapped(key, target, t, axes)
            transform = {"cls": self._cls, "reg": self._reg, "mask": self._mask}.get(kind)
            if transform is None:
                return _Mapped(key, target, t)
            result = transform(key, target, t)
            if result is None:
                self.failed_targets.add(target)
                return _ERROR
            return result
        return None

    def _droppable(self, key) -> Optional[str]:
        for pattern in self.extra_drop:
            if pattern.search(key):
                return f"matches --drop {pattern.pattern!r}"
        for pattern, reason in _DROPPABLE:
            if pattern.search(key):
                return reason
        return None

    def map_all(self) -> List[_Mapped]:
        mapped = []
        for key, t in self.source.items():
            result = self._map_one(key, t)
            if isinstance(result, _Mapped):
                if result.target in self.target:
                    mapped.append(result)
                    continue
                result = _NoPlace(result.target)
            if result is _ERROR:
                continue
            reason = self._droppable(key)
            if reason is not None:
                self.dropped.append((key, reason))
            elif isinstance(result, _NoPlace):
                self.unmapped.append(f"{key} (-> {result.target}, which the model does not have)")
            else:
                self.unmapped.append(f"{key} (not a Mask R-CNN FPN tensor this converter knows)")
        return mapped


def _take_classes(t: torch.Tensor, dim: int, block: int, perm: torch.Tensor, num_classes: int):
    """Reorder the first ``num_classes`` blocks of ``block`` entries along ``dim`` by ``perm``."""
    idx = (perm[:, None] * block + torch.arange(block)[None, :]).reshape(-1)
    rest = torch.arange(num_classes * block, t.shape[dim])
    return t.index_select(dim, torch.cat([idx, rest]))


def _listed(keys, limit=_MAX_LISTED):
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


def _hints(keys):
    found = []
    for key in keys:
        for needle, hint in _KEY_HINTS:
            if needle in key and hint not in found:
                found.append(hint)
    return f" Check {', '.join(found)} in the config." if found else ""


def convert_state_dict(
    source: "OrderedDict[str, torch.Tensor]",
    model,
    layout: str,
    *,
    class_perm: Optional[Sequence[int]] = None,
    drop: Sequence[str] = (),
    what: str = "the checkpoint",
):
    """Map an mmdetection state dict onto ``model``'s keys and shapes.

    Args:
        source: the mmdetection state dict.
        model: the detectron2 model the config builds (its state supplies names, shapes, dtypes
            and the values of ``_FILLED_FROM_MODEL`` keys).
        layout: "mmdet1" or "mmdet2".
        class_perm: for each model class, the index of that class in the checkpoint (``None``:
            the same order).
        drop: extra regular expressions of source keys to leave out (``--drop``).
        what: how error messages name the source.

    Returns:
        (state_dict, dropped, filled) with ``state_dict`` in the model's key order.

    Raises:
        ConversionError: naming every source key without a place in the model, every model key
            left unfilled and every tensor of the wrong shape.
    """
    target = model.state_dict()
    predictor = model.roi_heads.box_predictor
    num_classes = predictor.num_classes
    kind = _classifier_kind(model)
    conv = _Converter(source, target, layout, kind, type(predictor).__name__, num_classes, drop)
    mapped = conv.map_all()

    perm = None
    if class_perm is not None and list(class_perm) != list(range(num_classes)):
        if kind == "bags":
            raise ConversionError(
                f"{what}: reordering classes by name is not supported for BAGS' grouped classifier "
                "(a class's column depends on its group); convert with the checkpoint's class "
                "order."
            )
        perm = torch.as_tensor(list(class_perm), dtype=torch.long)

    out: Dict[str, torch.Tensor] = {}
    filled_by: Dict[str, str] = {}
    for m in mapped:
        t = m.tensor
        if perm is not None:
            for dim, block in m.class_axes:
                t = _take_classes(t, dim, block, perm, num_classes)
        want = target[m.target]
        if m.target in out:
            conv.errors.append(
                f"{m.target} would be filled by both {filled_by[m.target]} and {m.source}"
            )
            continue
        if tuple(t.shape) != tuple(want.shape):
            conv.failed_targets.add(m.target)
            conv.errors.append(
                f"{m.source} -> {m.target}: shape {tuple(t.shape)} in the checkpoint "
                f"(after conversion), {tuple(want.shape)} in the model"
            )
            continue
        # clone: a slice would otherwise save the whole source storage.
        out[m.target] = t.to(dtype=want.dtype).contiguous().clone()
        filled_by[m.target] = m.source

    filled, missing = [], []
    for key, value in target.items():
        if key in out or key in conv.failed_targets:
            continue
        for pattern, reason in _FILLED_FROM_MODEL:
            if pattern.search(key):
                out[key] = value.detach().clone()
                filled.append((key, reason))
                break
        else:
            missing.append(key)

    problems = []
    if conv.unmapped:
        problems.append(
            f"checkpoint keys with no place in the model ({len(conv.unmapped)}): "
            f"{_listed(conv.unmapped)}.{_hints(conv.unmapped)}"
        )
    if missing:
        problems.append(
            f"model keys the checkpoint does not fill ({len(missing)}): "
            f"{_listed(missing)}.{_hints(missing)}"
        )
    if conv.errors:
        problems.append(
            f"tensors that do not fit ({len(conv.errors)}): "
            + "; ".join(conv.errors[:_MAX_LISTED])
            + ("; ..." if len(conv.errors) > _MAX_LISTED else "")
            + "."
        )
    if problems:
        raise ConversionError(
            f"Cannot convert {what} ({layout} layout) into the model of this config:\n  - "
            + "\n  - ".join(problems)
            + "\nThe config must describe the checkpoint's model (depth, classes, heads, "
            "method); a key that is training state only can be left out with --drop REGEX."
        )
    state = OrderedDict((k, out[k]) for k in target)
    return state, conv.dropped, filled


# ---------------------------------------------------------------------------------------------
# Facts read from the source tensors


def _resnet_depth(source) -> Optional[int]:
    blocks = []
    for stage in range(1, 5):
        ids = {
            int(m.group(1))
            for k in source
            for m in [re.match(rf"^backbone\.layer{stage}\.(\d+)\.", k)]
            if m
        }
        blocks.append(len(ids))
    bottleneck = any(re.match(r"^backbone\.layer\d\.\d+\.conv3\.", k) for k in source)
    table = {
        (3, 4, 6, 3): 50 if bottleneck else 34,
        (3, 4, 23, 3): 101,
        (3, 8, 36, 3): 152,
        (2, 2, 2, 2): 18,
    }
    return table.get(tuple(blocks))


def _source_num_classes(source, layout) -> Optional[Tuple[int, str]]:
    roi = "roi_head." if layout == "mmdet2" else ""
    offset = 1 if layout == "mmdet1" else 0  # mmdet 1.x keeps a background slot
    reg = source.get(f"{roi}bbox_head.fc_reg.weight")
    if reg is not None and reg.shape[0] > 4:
        return reg.shape[0] // 4 - offset, f"{roi}bbox_head.fc_reg.weight has {reg.shape[0]} rows"
    logits = source.get(f"{roi}mask_head.conv_logits.weight")
    if logits is not None and logits.shape[0] > 1:
        return logits.shape[0] - offset, (
            f"{roi}mask_head.conv_logits.weight has " f"{logits.shape[0]} channels"
        )
    return None


# ---------------------------------------------------------------------------------------------
# Class order


def _lvis_name_variants(dataset: str) -> Optional[List[set]]:
    """Per class of a builtin LVIS dataset: its LVIS name and synonyms."""
    try:
        if dataset.startswith("lvis_v1"):
            from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES
        elif dataset.startswith("lvis_v0.5"):
            from detectron2.data.datasets.lvis_v0_5_categories import LVIS_CATEGORIES
        else:
            return None
    except ImportError:  # pragma: no cover - detectron2 without the LVIS tables
        return None
    cats = sorted(LVIS_CATEGORIES, key=lambda c: c["id"])
    return [{c["name"], *c.get("synonyms", ())} for c in cats]


def _target_classes(cfg) -> Tuple[Optional[List[str]], Optional[List[set]], str]:
    """(thing_classes, accepted names per class, dataset) of the config's test dataset."""
    from detectron2.data import MetadataCatalog

    datasets = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
    if not datasets:
        return None, None, ""
    dataset = datasets[0]
    names = getattr(MetadataCatalog.get(dataset), "thing_classes", None)
    if not names:
        return None, None, dataset
    variants = [{n} for n in names]
    lvis = _lvis_name_variants(dataset)
    if lvis is not None and len(lvis) == len(names):
        variants = [v | lv for v, lv in zip(variants, lvis)]
    return list(names), variants, dataset


def _canonical(name: str) -> str:
    return _CLASS_NAME_ALIASES.get(name, name)


def _class_permutation(src_names, cfg, order: str, what: str) -> Optional[List[int]]:
    """Check the checkpoint's class names against the config's dataset; the permutation for
    ``order == "by-name"``."""
    names, variants, dataset = _target_classes(cfg)
    if src_names is None:
        logger.warning(
            "%s carries no class names (meta.CLASSES / meta.dataset_meta.classes): the "
            "class order cannot be checked; it is assumed to be %s's.",
            what,
            dataset or "the dataset's",
        )
        return None
    if names is None:
        logger.warning(
            "The config's dataset %r has no thing_classes metadata: the checkpoint's "
            "class order cannot be checked.",
            dataset,
        )
        return None
    variants = [{_canonical(n) for n in v} for v in variants]
    src = [_canonical(n) for n in src_names]
    if len(src) != len(names):
        raise ConversionError(
            f"{what} names {len(src)} classes, {dataset} has {len(names)}: use the config of the "
            "dataset the checkpoint was trained on."
        )
    if order == "by-name":
        position = {}
        for i, n in enumerate(src):
            position.setdefault(n, i)
        perm, missing = [], []
        for k, v in enumerate(variants):
            hits = sorted({position[n] for n in v if n in position})
            if len(hits) != 1:
                missing.append(f"{k} {names[k]!r}")
            else:
                perm.append(hits[0])
        if missing or len(set(perm)) != len(perm):
            raise ConversionError(
                f"Cannot reorder {what}'s classes by name: {len(missing)} classes of {dataset} "
                f"have no unique match among its names ({_listed(missing, 10)})."
            )
        moved = sum(1 for k, i in enumerate(perm) if k != i)
        logger.info("Classes reordered by name: %d of %d classes move.", moved, len(perm))
        return perm
    bad = [
        f"{k}: checkpoint {s!r} vs {dataset} {names[k]!r}"
        for k, (s, v) in enumerate(zip(src, variants))
        if s not in v
    ]
    if bad:
        raise ConversionError(
            f"{what}'s classes are not those of {dataset} in the same order; first mismatches: "
            f"{'; '.join(bad[:10])}{' ...' if len(bad) > 10 else ''} ({len(bad)} in all). Use the "
            "config of the dataset the checkpoint was trained on, or --class-order by-name to "
            "reorder the classifier, regression and mask outputs by class name."
        )
    logger.info(
        "Class names checked: the checkpoint's %d classes are %s's, in order.", len(src), dataset
    )
    return None


# ---------------------------------------------------------------------------------------------
# Conventions: style, normalisation, RoIAlign, anchors


def _decide_style(flag, info: _TrainingConfig, check_meta: bool) -> Tuple[str, str]:
    """(style, where it comes from)."""
    if flag is not None:
        if check_meta and info.style is not None and info.style != flag:
            raise ConversionError(
                f"--style {flag} contradicts the checkpoint's training config "
                f"(style='{info.style}'). Drop --style, or pass --no-meta-check if the recorded "
                "config is wrong."
            )
        return flag, "--style"
    if info.style in STYLES:
        logger.info("Backbone style %r, from the checkpoint's training config.", info.style)
        return info.style, "the checkpoint's training config"
    logger.warning(
        "The checkpoint does not record its backbone style and the weights cannot tell (pytorch "
        "and caffe ResNets have the same tensors): assuming 'pytorch' (stride in the 3x3 conv, RGB "
        "input), the style of every released model of the seed papers. Pass --style caffe for a "
        "caffe-style (MSRA) backbone."
    )
    return "pytorch", "assumed: the checkpoint does not record it"


def _conventions(
    layout, style, style_source, info: _TrainingConfig
) -> Tuple[Dict[str, object], List[str]]:
    """The OUT.yaml overrides and header notes for the layout and style."""
    norm = dict(_STYLE_NORMALISATION[style])
    source = f"mmdetection's {style}-style default"
    if info.mean is not None and info.std is not None and info.to_rgb is not None:
        norm = dict(mean=info.mean, std=info.std, to_rgb=info.to_rgb)
        source = "the checkpoint's training config"
    if len(norm["mean"]) != 3 or len(norm["std"]) != 3:
        raise ConversionError(f"Unexpected normalisation mean/std {norm}: 3 values each expected.")
    rgb = bool(norm["to_rgb"])
    overrides = {
        # Stride in the 1x1 (caffe/MSRA) or the 3x3 (pytorch/torchvision) conv of each bottleneck.
        "MODEL.RESNETS.STRIDE_IN_1X1": style == "caffe",
        # mmdet's mean/std are in the order of the image it normalises (RGB after to_rgb), which is
        # the order detectron2 reads PIXEL_MEAN/STD in with this INPUT.FORMAT.
        "INPUT.FORMAT": "RGB" if rgb else "BGR",
        "MODEL.PIXEL_MEAN": [float(v) for v in norm["mean"]],
        "MODEL.PIXEL_STD": [float(v) for v in norm["std"]],
        # target_stds (1, 1, 1, 1) and (0.1, 0.1, 0.2, 0.2) of mmdet's DeltaXYWHBBoxCoder.
        "MODEL.RPN.BBOX_REG_WEIGHTS": [1.0, 1.0, 1.0, 1.0],
        "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS": [10.0, 10.0, 5.0, 5.0],
    }
    notes = [
        f"Input: {'RGB' if rgb else 'BGR'}, mean {overrides['MODEL.PIXEL_MEAN']}, std "
        f"{overrides['MODEL.PIXEL_STD']} ({source}); {style}-style backbone ({style_source})."
    ]
    if layout == "mmdet2":
        overrides.update(
            {
                # mmcv RoIAlign(aligned=True, sampling_ratio=0) is detectron2's ROIAlignV2.
                "MODEL.ROI_BOX_HEAD.POOLER_TYPE": "ROIAlignV2",
                "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": 0,
                "MODEL.ROI_MASK_HEAD.POOLER_TYPE": "ROIAlignV2",
                "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO": 0,
                # mmdet 2.x anchors are centred on the grid points (center_offset 0), as
                # detectron2's.
                "MODEL.ANCHOR_GENERATOR.OFFSET": 0.0,
            }
        )
    else:
        overrides.update(
            {
                # mmdet 1.x RoIAlign(sample_num=2) is the legacy, unaligned kernel.
                "MODEL.ROI_BOX_HEAD.POOLER_TYPE": "ROIAlign",
                "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": 2,
                "MODEL.ROI_MASK_HEAD.POOLER_TYPE": "ROIAlign",
                "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO": 2,
                # mmdet 1.x anchor centres sit at stride * i + (stride - 1) / 2; offset 0.5 puts
                # detectron2's at stride * i + stride / 2, half a pixel away (0: up to 31.5).
                "MODEL.ANCHOR_GENERATOR.OFFSET": 0.5,
            }
        )
        notes.append(
            "mmdetection 1.x used the legacy '+1' box convention (width = x2 - x1 + 1 in box "
            "encoding/decoding, IoU, NMS and RoI level assignment) and integer-rounded anchors "
            "centred at (stride - 1) / 2. detectron2 has no '+1' switch: anchors are centred "
            "half a pixel away (OFFSET 0.5), decoded boxes differ by up to about a pixel, and "
            "mask pasting and RoIAlign sampling differ by sub-pixel amounts. Expect AP within a "
            "few tenths of the "
            "authors' numbers, not identical ones."
        )
    if info.mask_threshold is not None and not math.isclose(info.mask_threshold, 0.5):
        notes.append(
            f"The checkpoint's config binarises masks at {info.mask_threshold}; detectron2 always "
            "uses 0.5 (no config key), so mask AP can differ slightly."
        )
    return overrides, notes


def _check_against_training_config(cfg, info: _TrainingConfig, what: str) -> None:
    """Errors where the checkpoint's recorded model contradicts the config's."""
    if not info.present:
        logger.warning(
            "%s records no training config: the box classifier type (linear/cosine), "
            "its temperature and the mask head type are taken from the config unchecked.",
            what,
        )
        return
    lt = cfg.MODEL.LONGTAIL
    problems = []
    if info.normed_linear is not None:
        cosine = lt.CLASSIFIER == "cosine"
        if info.normed_linear != cosine:
            problems.append(
                "its box classifier is "
                f"{'NormedLinear (cosine)' if info.normed_linear else 'a plain Linear'}, "
                f"the config's MODEL.LONGTAIL.CLASSIFIER is {lt.CLASSIFIER!r}"
            )
        elif (
            cosine
            and info.linear_temperature is not None
            and not math.isclose(info.linear_temperature, lt.COSINE_SCALE)
        ):
            problems.append(
                f"its NormedLinear temperature is {info.linear_temperature:g}, the "
                f"config's MODEL.LONGTAIL.COSINE_SCALE {lt.COSINE_SCALE:g}"
            )
    if info.normed_conv is not None and cfg.MODEL.MASK_ON:
        cosine = cfg.MODEL.ROI_MASK_HEAD.NAME == "CosineMaskRCNNConvUpsampleHead"
        if info.normed_conv != cosine:
            problems.append(
                f"its mask logits are {'a NormedConv2d' if info.normed_conv else 'a plain conv'}, "
                "the "
                f"config's MODEL.ROI_MASK_HEAD.NAME is {cfg.MODEL.ROI_MASK_HEAD.NAME!r}"
            )
        elif (
            cosine
            and info.conv_temperature is not None
            and not math.isclose(info.conv_temperature, lt.MASK_COSINE_SCALE)
        ):
            problems.append(
                f"its NormedConv2d temperature is {info.conv_temperature:g}, the "
                f"config's MODEL.LONGTAIL.MASK_COSINE_SCALE {lt.MASK_COSINE_SCALE:g}"
            )
    if problems:
        raise ConversionError(
            f"{what}'s training config does not match the config: "
            + "; ".join(problems)
            + ". Use the config of this model (configs/released/), or pass --no-meta-check if the "
            "recorded training config is wrong."
        )


# ---------------------------------------------------------------------------------------------
# Writing


def _log_grouped(message, items):
    """One INFO line per reason (the first keys listed), every key at DEBUG."""
    by_reason: Dict[str, List[str]] = OrderedDict()
    for key, reason in items:
        by_reason.setdefault(reason, []).append(key)
    for reason, keys in by_reason.items():
        logger.info(message, len(keys), reason, _listed(keys, 5))
        for key in keys:
            logger.debug("  %s", key)


def _nested(overrides: Dict[str, object]) -> dict:
    root: dict = {}
    for dotted, value in overrides.items():
        node = root
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = list(value) if isinstance(value, tuple) else value
    return root


def _opts_to_overrides(opts: Sequence[str]) -> Dict[str, object]:
    """KEY VALUE pairs as detectron2 parses them (literal_eval, else the string)."""
    import ast

    if len(opts) % 2:
        raise ConversionError(f"Config overrides must be KEY VALUE pairs, got {list(opts)}.")
    result = {}
    for key, value in zip(opts[0::2], opts[1::2]):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        result[key] = list(parsed) if isinstance(parsed, tuple) else parsed
    return result


def _write_yaml(path, base, overrides, header):
    import yaml

    class _Dumper(yaml.SafeDumper):
        """Nested nodes as blocks, lists on one line (as the project's configs are written)."""

    _Dumper.add_representer(
        list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True)
    )
    wrapped = []
    for line in header:
        wrapped += textwrap.wrap(
            line, 96, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False
        ) or [""]
    text = "".join(f"# {line}\n" if line else "#\n" for line in wrapped)
    text += yaml.dump(
        {"_BASE_": base, **_nested(overrides)},
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
    )
    _atomic_write(path, lambda f: f.write(text.encode()))


def _atomic_write(path, write):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".convert_mmdet-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# Entry points


def convert_checkpoint(
    in_path: str,
    out_path: str,
    config: str,
    *,
    layout: Optional[str] = None,
    style: Optional[str] = None,
    class_order: str = "check",
    drop: Sequence[str] = (),
    check_meta: bool = True,
    overwrite: bool = False,
    opts: Sequence[str] = (),
) -> ConversionResult:
    """Convert ``in_path`` (mmdetection) into ``out_path`` (+ ``.yaml``) for ``config``.

    Args:
        in_path: the mmdetection checkpoint.
        out_path: the converted checkpoint, ending in ``.pth``; the config goes next to it with
            ``.yaml`` instead.
        config: a detectron2 config of this project describing the checkpoint's model.
        layout: "mmdet1" / "mmdet2"; None detects it from the keys.
        style: "pytorch" / "caffe"; None: the checkpoint's training config, else "pytorch".
        class_order: "check" (fail on any class-name mismatch) or "by-name" (reorder the outputs
            to the dataset's class order).
        drop: regular expressions of extra checkpoint keys to leave out (logged).
        check_meta: compare the checkpoint's recorded training config with ``config``.
        overwrite: replace existing output files.
        opts: extra KEY VALUE config overrides, used for the conversion and written to OUT.yaml.

    Returns:
        A :class:`ConversionResult`.

    Raises:
        ConversionError: with the reason and what to do.
    """
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from .. import add_longtail_config  # importing longtail also registers its modules

    if layout is not None and layout not in LAYOUTS:
        raise ConversionError(f"--layout must be one of {LAYOUTS}, got {layout!r}.")
    if style is not None and style not in STYLES:
        raise ConversionError(f"--style must be one of {STYLES}, got {style!r}.")
    for pattern in drop:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConversionError(f"--drop {pattern!r} is not a regular expression: {e}") from e
    if class_order not in ("check", "by-name"):
        raise ConversionError(f"--class-order must be 'check' or 'by-name', got {class_order!r}.")
    root, ext = os.path.splitext(out_path)
    if ext != ".pth":
        raise ConversionError(
            f"OUT must end in .pth (detectron2 reads .pkl files as pickles of "
            f"numpy arrays), got {out_path}."
        )
    yaml_path = root + ".yaml"
    if not os.path.isfile(config):
        raise ConversionError(f"Config {config} does not exist.")
    if not overwrite:
        for path in (out_path, yaml_path):
            if os.path.exists(path):
                raise ConversionError(f"{path} already exists; pass --overwrite to replace it.")

    source, meta = load_mmdet_checkpoint(in_path)
    detected = None
    try:
        detected = detect_layout(list(source))
    except ConversionError:
        if layout is None:
            raise
    if layout is None:
        layout = detected
    elif detected is not None and detected != layout:
        logger.warning(
            "--layout %s given, but the keys of %s look like %s.", layout, in_path, detected
        )
    what = os.path.basename(in_path)
    logger.info("%s: %d tensors, %s layout.", in_path, len(source), layout)

    info = _read_training_config(meta)
    chosen_style, style_source = _decide_style(style, info, check_meta)
    overrides, notes = _conventions(layout, chosen_style, style_source, info)

    cfg = get_cfg()
    add_longtail_config(cfg)
    user = _opts_to_overrides(opts)
    try:
        cfg.merge_from_file(config)
        cfg.merge_from_list([x for kv in overrides.items() for x in kv])
        # The user's KEY VALUE pairs come last, so they may also replace a convention on purpose.
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError) as e:
        raise ConversionError(f"Cannot load config {config} with {list(opts)}: {e}") from e
    for key in user:
        if key in overrides:
            logger.warning("%s %r replaces the converter's %r.", key, user[key], overrides[key])

    depth = _resnet_depth(source)
    if depth is not None and depth != cfg.MODEL.RESNETS.DEPTH:
        raise ConversionError(
            f"{what} holds a ResNet-{depth} backbone, the config builds MODEL.RESNETS.DEPTH "
            f"{cfg.MODEL.RESNETS.DEPTH}: use the config of this model or set the depth."
        )
    found = _source_num_classes(source, layout)
    if found is not None and found[0] != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        raise ConversionError(
            f"{what} predicts {found[0]} classes ({found[1]}), the config builds "
            f"MODEL.ROI_HEADS.NUM_CLASSES {cfg.MODEL.ROI_HEADS.NUM_CLASSES}: use the config of the "
            "dataset it was trained on (LVIS v1: 1203, LVIS v0.5: 1230)."
        )
    if check_meta:
        _check_against_training_config(cfg, info, what)
    else:
        logger.warning(
            "--no-meta-check: the checkpoint's recorded training config is not compared "
            "with the config."
        )
    perm = _class_permutation(_checkpoint_classes(meta), cfg, class_order, what)

    build_cfg = cfg.clone()
    build_cfg.MODEL.DEVICE = "cpu"
    build_cfg.MODEL.WEIGHTS = ""
    try:
        model = build_model(build_cfg)
    except (OSError, KeyError, ValueError) as e:
        # Typically the class statistics of ECM / IIF / BAGS: DATASETS.TRAIN's json is needed.
        raise ConversionError(
            f"Cannot build the model of {config}: {e}. Methods whose buffers derive from class "
            "statistics need DATASETS.TRAIN's annotation file (datasets/README.md) or "
            "MODEL.LONGTAIL.CLASS_STATS_PATH given as KEY VALUE."
        ) from e
    model.eval()
    state, dropped, filled = convert_state_dict(
        source, model, layout, class_perm=perm, drop=drop, what=what
    )
    # The same strict load --eval-only does: every key present, every shape right.
    model.load_state_dict(state, strict=True)
    _log_grouped("Left out %d checkpoint keys, %s: %s", dropped)
    _log_grouped("Kept the model's own value of %d keys, %s: %s", filled)

    overrides = {**overrides, **user, "MODEL.WEIGHTS": os.path.abspath(out_path)}
    result = ConversionResult(state, overrides, layout, chosen_style, dropped, filled, notes)
    yaml_dir = os.path.dirname(os.path.abspath(yaml_path))
    base = os.path.relpath(os.path.abspath(config), yaml_dir)
    header = [
        f"Written by `python -m longtail.tools.convert_mmdet` from {os.path.abspath(in_path)} "
        f"({layout} layout) for {config}.",
        f"Evaluate: python train_net.py --config-file {yaml_path} --eval-only",
        "",
        *notes,
        f"{len(dropped)} checkpoint keys left out (training state) and {len(filled)} model "
        "buffers kept from the config: see the conversion log.",
    ]
    checkpoint = {
        "model": state,
        "__author__": f"longtail.tools.convert_mmdet from {os.path.basename(in_path)}",
        "matching_heuristics": False,
    }
    _atomic_write(out_path, lambda f: torch.save(checkpoint, f))
    _write_yaml(yaml_path, base, overrides, header)
    result.out_path, result.yaml_path = out_path, yaml_path
    logger.info("Wrote %s (%d tensors) and %s.", out_path, len(state), yaml_path)
    return result


def _argument_parser():
    parser = argparse.ArgumentParser(
        prog="python -m longtail.tools.convert_mmdet",
        description="Convert an mmdetection Mask/Faster R-CNN R50/R101-FPN checkpoint into this "
        "project's detectron2 layout: writes OUT.pth and OUT.yaml (the config to evaluate it "
        "with).",
        epilog="Example: python -m longtail.tools.convert_mmdet r50_ecm_1x.pth "
        "output/released/ecm_r50_1x.pth --config "
        "configs/released/LVISv1_ecm_mask_rcnn_R_50_FPN_1x.yaml",
    )
    parser.add_argument("input", metavar="IN.pth", help="the mmdetection checkpoint")
    parser.add_argument(
        "output",
        metavar="OUT.pth",
        help="the converted checkpoint; OUT.yaml " "is written next to it",
    )
    parser.add_argument(
        "--config",
        required=True,
        help="a config of this project that describes "
        "the checkpoint's model (e.g. one of configs/released/)",
    )
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        help="the checkpoint's key layout " "(default: detected from the keys)",
    )
    parser.add_argument(
        "--style",
        choices=STYLES,
        help="backbone style; the weights cannot tell "
        "(default: the checkpoint's training config, else pytorch)",
    )
    parser.add_argument(
        "--class-order",
        choices=("check", "by-name"),
        default="check",
        help="'check': fail unless the checkpoint's class names are the "
        "dataset's, in order; 'by-name': reorder the outputs by name",
    )
    parser.add_argument(
        "--drop",
        action="append",
        default=[],
        metavar="REGEX",
        help="leave out checkpoint keys matching REGEX (training-only state the "
        "converter does not know); repeatable, every drop is logged",
    )
    parser.add_argument(
        "--no-meta-check",
        action="store_true",
        help="do not compare the " "checkpoint's recorded training config with --config",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT.pth / OUT.yaml")
    parser.add_argument(
        "opts",
        nargs="*",
        metavar="KEY VALUE",
        help="config overrides (e.g. "
        "MODEL.LONGTAIL.CLASS_STATS_PATH stats.json), also written to OUT.yaml",
    )
    return parser


def main(argv=None) -> int:
    # Intermixed: the options may come before or after IN / OUT and the KEY VALUE pairs.
    args = _argument_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = convert_checkpoint(
            args.input,
            args.output,
            args.config,
            layout=args.layout,
            style=args.style,
            class_order=args.class_order,
            drop=args.drop,
            check_meta=not args.no_meta_check,
            overwrite=args.overwrite,
            opts=args.opts,
        )
    except ConversionError as e:
        logger.error("%s", e)
        return 1
    for note in result.notes:
        logger.info("Note: %s", note)
    logger.info(
        "Evaluate with: python train_net.py --config-file %s --eval-only MODEL.WEIGHTS %s",
        result.yaml_path,
        result.out_path,
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
