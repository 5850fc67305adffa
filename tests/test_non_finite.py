"""NaN/inf never reaches a method's buffers and stops training with a message that says where.

Per stateful method: NaN/inf features (or logits) through the predictor's training losses in an
EventStorage raise FloatingPointError naming the method, the statistic and the iteration, with
every buffer bit-identical afterwards (EQL v2, LDA, PCB on each base); ECM and Seesaw count labels
only, so their buffers take exactly what finite features would give and the NaN shows up in the
loss, which the trainer's guard stops. Then two ranks where only one sees the NaN (both raise, none
hangs), and the trainer: a NaN loss term stops LongTailTrainer before the optimizer step and any
checkpoint."""

import json
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.engine import HookBase
from detectron2.layers import ShapeSpec
from detectron2.utils.events import EventStorage, get_event_storage

from distributed_helpers import launch_two_ranks
from predictor_helpers import FEATURES, predictor_args, proposals_with_labels
from longtail import add_longtail_config
from longtail.engine import LongTailTrainer
from longtail.engine.guards import check_losses_finite, method_description
from longtail.modeling import LongTailROIHeads
from longtail.modeling.distributed import all_reduce_sum
from longtail.modeling.guards import check_finite_statistics, mark_non_finite
from longtail.modeling.pcb_roi_heads import ConfusionMatrixEMA
from longtail.modeling.predictors import (
    ECMOutputLayers,
    EQLv2OutputLayers,
    LDAOutputLayers,
    SeesawOutputLayers,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO, "configs", "quick_schedules", "ce_instant_test.yaml")
C = 3
BG = C
LABELS = [[0, 1, BG, BG], [2, 0, BG]]
BAD = {"nan": float("nan"), "inf": float("inf")}


def _buffer_bytes(module):
    """Every buffer of ``module`` as (dtype, shape, raw bytes): equal means bit-identical."""
    return {
        name: (
            b.dtype,
            tuple(b.shape),
            b.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes(),
        )
        for name, b in module.named_buffers()
    }


def _features(num, seed=0, bad=None):
    x = torch.randn(num, FEATURES, generator=torch.Generator().manual_seed(seed))
    if bad is not None:
        x[1] = BAD[bad]  # one RoI (a foreground one in LABELS) is enough
    return x


def _train_losses(predictor, labels=LABELS, iteration=0, bad=None, seed=0):
    proposals = proposals_with_labels(labels)
    with EventStorage(start_iter=iteration):
        predictions = predictor(_features(sum(len(p) for p in proposals), seed, bad))
        return predictor.losses(predictions, proposals)


# ------------------------------------------------------------------ the helper


def test_mark_and_check_name_method_statistic_and_iteration():
    local = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert torch.equal(mark_non_finite(local, torch.ones(3), torch.empty(0, 4)), local)
    marked = mark_non_finite(local, torch.tensor([0.0, float("inf")]))
    assert marked.dtype == local.dtype and marked.shape == local.shape and marked.isnan().all()
    check_finite_statistics(local, method="M", statistic="s")  # finite: no error
    with EventStorage(start_iter=17):
        with pytest.raises(
            FloatingPointError,
            match=r"^Method: non-finite the stat at iteration 17.*"
            r"buffers\s+were left as they were",
        ):
            check_finite_statistics(marked, method="Method", statistic="the stat")
    with pytest.raises(FloatingPointError, match="no event storage open"):
        check_finite_statistics(marked, method="Method", statistic="the stat")


# ------------------------------------------------------------------ refusing predictors


def _eqlv2():
    torch.manual_seed(0)
    return EQLv2OutputLayers(**predictor_args(C)).train()


def _lda():
    torch.manual_seed(0)
    return LDAOutputLayers(
        **predictor_args(C), class_counts=[50, 5, 1], projection_dim=4, window=3
    ).train()


@pytest.mark.parametrize("bad", sorted(BAD))
@pytest.mark.parametrize(
    "build, method, statistic",
    [
        (_eqlv2, "EQLv2OutputLayers", r"gradient statistics \(eqlv2_pos_grad, eqlv2_neg_grad\)"),
        (_lda, "LDAOutputLayers", r"training accuracies of h' and h \(lda_acc_unbalanced"),
    ],
    ids=["eqlv2", "lda"],
)
def test_predictor_refuses_non_finite_logits_and_keeps_its_buffers(build, method, statistic, bad):
    predictor = build()
    for step in range(2):  # some history, so that "unchanged" is not just "still zero"
        _train_losses(predictor, iteration=step, seed=step)
    before = _buffer_bytes(predictor)
    with pytest.raises(
        FloatingPointError, match=rf"^{method}: non-finite {statistic}.* at iteration 2\b"
    ):
        _train_losses(predictor, iteration=2, bad=bad)
    assert _buffer_bytes(predictor) == before
    # The next finite iteration goes on from the same statistics.
    _train_losses(predictor, iteration=3, seed=3)
    assert all(torch.isfinite(b).all() for b in predictor.buffers() if b.is_floating_point())


def test_lda_argmax_alone_would_have_counted_nan_logits():
    # Why LDA checks the logits and not only its counts: argmax of a NaN row is a valid index.
    logits = torch.tensor([[float("nan"), 0.0, 1.0]])
    assert logits.argmax(dim=1).tolist() == [0]


def _pcb_heads(base):
    predictors = {
        "ce": ["MODEL.LONGTAIL.PREDICTOR", "SoftmaxCEOutputLayers"],
        "eqlv2": ["MODEL.LONGTAIL.PREDICTOR", "EQLv2OutputLayers"],
        "seesaw": ["MODEL.LONGTAIL.PREDICTOR", "SeesawOutputLayers"],
    }
    cfg = get_cfg()
    add_longtail_config(cfg)
    cfg.merge_from_file(QUICK)
    cfg.merge_from_list(
        [
            "MODEL.LONGTAIL.PCB.ENABLED",
            "True",
            "MODEL.LONGTAIL.PCB.START_ITER",
            "0",
            "MODEL.LONGTAIL.PCB.REQUIRE_ALL_SEEN",
            "False",
            "MODEL.ROI_HEADS.NUM_CLASSES",
            str(C),
            "MODEL.ROI_BOX_HEAD.FC_DIM",
            "16",
            "MODEL.LONGTAIL.PCB.MLP_HIDDEN",
            "8",
            *predictors[base],
        ]
    )
    torch.manual_seed(0)
    shapes = {
        f: ShapeSpec(channels=8, stride=s) for f, s in zip(["p2", "p3", "p4", "p5"], [4, 8, 16, 32])
    }
    return LongTailROIHeads(cfg, shapes).train()


def _pcb_losses(heads, iteration, seed=0, bad=None):
    g = torch.Generator().manual_seed(seed)
    features = {
        f: torch.randn(len(LABELS), 8, 64 // s, 64 // s, generator=g)
        for f, s in zip(["p2", "p3", "p4", "p5"], [4, 8, 16, 32])
    }
    if bad is not None:
        for f in features.values():
            f.fill_(BAD[bad])
    with EventStorage(start_iter=iteration):
        return heads._forward_box(features, proposals_with_labels(LABELS))


@pytest.mark.parametrize("base", ["ce", "eqlv2", "seesaw"])
def test_pcb_refuses_non_finite_probabilities_and_keeps_every_buffer(base):
    heads = _pcb_heads(base)
    for step in range(2):
        _pcb_losses(heads, step, seed=step)
    assert float(heads.pcb.confusion.pcb_seen.sum()) > 0
    before = _buffer_bytes(heads)  # the confusion matrix and the base predictor's buffers
    with pytest.raises(
        FloatingPointError,
        match=r"^PCB: non-finite confusion statistics \(pcb_cm, pcb_seen\) at iteration 2\b",
    ):
        _pcb_losses(heads, 2, bad="nan")
    assert _buffer_bytes(heads) == before


def test_pcb_checks_the_logits_too():
    # EQL v2's sigmoid maps an inf logit to a finite probability 1: the logits are checked as well.
    ema = ConfusionMatrixEMA(C, momentum=0.9, normalized=False)
    ema.update(torch.full((2, C), 0.5), torch.tensor([0, 1]))
    before = _buffer_bytes(ema)
    logits = torch.tensor([[float("inf"), 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    probs = torch.sigmoid(logits[:, :C])
    assert torch.isfinite(probs).all()
    with EventStorage(start_iter=5), pytest.raises(FloatingPointError, match="at iteration 5"):
        ema.update(probs, torch.tensor([0, 1]), logits=logits)
    assert _buffer_bytes(ema) == before


# ------------------------------------------------------------------ label-only statistics


def _ecm(measure_iters):
    torch.manual_seed(0)
    return ECMOutputLayers(
        **predictor_args(C), class_counts=[50, 5, 1], measure_iters=measure_iters
    ).train()


def _seesaw():
    torch.manual_seed(0)
    return SeesawOutputLayers(**predictor_args(C)).train()


@pytest.mark.parametrize(
    "build",
    [lambda: _ecm(measure_iters=0), lambda: _ecm(measure_iters=5), _seesaw],
    ids=["ecm_frozen", "ecm_measuring", "seesaw"],
)
def test_label_count_methods_take_no_nan_and_the_loss_carries_it(build):
    clean, poisoned = build(), build()
    _train_losses(clean, iteration=0)
    losses = _train_losses(poisoned, iteration=0, bad="nan")
    # The counts come from the labels only: bit-identical to those of finite features.
    assert _buffer_bytes(poisoned) == _buffer_bytes(clean)
    # The NaN is in the loss, where LongTailTrainer's guard stops the run (tests below).
    assert not all(torch.isfinite(v) for v in losses.values())
    with (
        EventStorage(start_iter=0),
        pytest.raises(FloatingPointError, match="iteration 0 training X"),
    ):
        check_losses_finite(losses, "X")


# ------------------------------------------------------------------ two ranks


def _two_rank_worker(out_path):
    from detectron2.utils import comm

    rank = comm.get_rank()
    results = {}
    # Only rank 1 has a NaN in its statistics, rank 0 only finite ones.
    local = torch.tensor([1.0, 2.0], dtype=torch.float64)
    inputs = torch.tensor([float("nan")]) if rank == 1 else torch.ones(1)
    with EventStorage(start_iter=4):
        try:
            check_finite_statistics(
                all_reduce_sum(mark_non_finite(local, inputs)), method="M", statistic="s"
            )
            results["statistics"] = "no error"
        except FloatingPointError as e:
            results["statistics"] = str(e)
        # Only rank 0 has a NaN loss term.
        loss = {
            "loss_a": torch.tensor(1.0),
            "loss_b": torch.tensor(float("nan") if rank == 0 else 2.0),
        }
        try:
            check_losses_finite(loss, "M")
            results["loss"] = "no error"
        except FloatingPointError as e:
            results["loss"] = str(e)
    gathered = comm.gather(results, dst=0)
    if comm.is_main_process():
        with open(out_path, "w") as f:
            json.dump(gathered, f)


def test_two_ranks_stop_together_when_one_sees_nan(tmp_path):
    out = tmp_path / "ranks.json"
    launch_two_ranks(_two_rank_worker, str(out))
    ranks = json.loads(out.read_text())
    for rank in ranks:
        assert rank["statistics"].startswith("M: non-finite s at iteration 4")
        assert rank["loss"].startswith("Non-finite loss at iteration 4 training M: loss_b")
    assert "loss_b = nan" in ranks[0]["loss"]
    assert "loss_b (non-finite on another rank)" in ranks[1]["loss"]
    assert "loss_a" not in ranks[0]["loss"]


# ------------------------------------------------------------------ the trainer


def test_method_description_names_the_predictor_and_pcb():
    cfg = get_cfg()
    add_longtail_config(cfg)
    cfg.MODEL.LONGTAIL.PREDICTOR = "EQLv2OutputLayers"
    assert method_description(cfg) == "EQLv2OutputLayers"
    cfg.MODEL.LONGTAIL.PCB.ENABLED = True
    assert method_description(cfg) == "EQLv2OutputLayers + PCB"


class _Snapshot(HookBase):
    """Keeps the weights and optimizer state after each finished step."""

    def __init__(self):
        self.after = {}

    def after_step(self):
        self.after[self.trainer.iter] = {
            "params": {k: v.detach().clone() for k, v in self.trainer.model.named_parameters()},
            "momentum": [
                s["momentum_buffer"].clone() for s in self.trainer.optimizer.state.values()
            ],
        }


def test_trainer_stops_at_a_nan_loss_before_the_step_and_any_checkpoint(tmp_path, shapes_lt_root):
    out = str(tmp_path)
    cfg = get_cfg()
    add_longtail_config(cfg)
    cfg.merge_from_file(QUICK)
    cfg.merge_from_list(
        [
            "OUTPUT_DIR",
            out,
            "SOLVER.MAX_ITER",
            "6",
            "SOLVER.CHECKPOINT_PERIOD",
            "3",
            "DATASETS.TEST",
            "()",
        ]
    )
    trainer = LongTailTrainer(cfg)
    snapshot = _Snapshot()
    trainer.register_hooks([snapshot])

    def nan_logits_at_iteration_2(module, inputs, output):
        if get_event_storage().iter == 2:
            scores, deltas = output
            return scores * float("nan"), deltas
        return output

    trainer.model.roi_heads.box_predictor.register_forward_hook(nan_logits_at_iteration_2)
    trainer.resume_or_load(resume=False)
    with pytest.raises(FloatingPointError) as info:
        trainer.train()
    message = str(info.value)
    assert message.startswith(
        "Non-finite loss at iteration 2 training FastRCNNOutputLayers: loss_cls = nan"
    )
    assert "loss_box_reg" not in message  # only the non-finite terms are listed
    assert "before the backward pass and the optimizer step" in message
    # Iteration 2 never stepped: the weights and the momentum are those after iteration 1.
    # (Its forward pass did run: BatchNorm running statistics moved, with finite values.)
    assert sorted(snapshot.after) == [0, 1]
    assert any(
        not torch.equal(v, snapshot.after[0]["params"][k])
        for k, v in snapshot.after[1]["params"].items()
    )
    for key, value in trainer.model.named_parameters():
        assert torch.equal(value, snapshot.after[1]["params"][key]), key
    momentum = [s["momentum_buffer"] for s in trainer.optimizer.state.values()]
    assert all(torch.equal(a, b) for a, b in zip(momentum, snapshot.after[1]["momentum"]))
    # CHECKPOINT_PERIOD 3 would have saved after iteration 2: nothing was written.
    assert not [f for f in os.listdir(out) if f.endswith(".pth") or f == "last_checkpoint"]
