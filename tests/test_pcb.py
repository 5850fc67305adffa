"""PCB's iterative head and confusion-matrix regulariser (modeling/pcb_roi_heads.py) against
functional/pcb.py; its buffers across ranks and checkpoints; the hook; a short run per base."""
import json
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import train_net
from predictor_helpers import proposals_with_labels
from longtail import add_longtail_config
from longtail.data import ClassStats
from longtail.engine import LongTailTrainer
from longtail.engine.hooks import PCBConfusionHook
from longtail.functional.pcb import (
    pcb_batch_statistics,
    pcb_ema_update,
    pcb_fightback_targets,
    pcb_mixed_targets,
    soft_cross_entropy,
)
from longtail.modeling import LongTailROIHeads
from longtail.modeling.pcb_roi_heads import ConfusionMatrixEMA
from distributed_helpers import launch_two_ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO, "configs", "quick_schedules", "ce_instant_test.yaml")
C = 4
BG = C
BASES = {
    "ce": ["MODEL.LONGTAIL.PREDICTOR", "SoftmaxCEOutputLayers"],
    "ce_rfs": ["MODEL.LONGTAIL.PREDICTOR", "SoftmaxCEOutputLayers",
               "DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler", "DATALOADER.REPEAT_THRESHOLD", "0.1"],
    "eqlv2": ["MODEL.LONGTAIL.PREDICTOR", "EQLv2OutputLayers", "MODEL.LONGTAIL.PCB.MLP_LAYER_NORM", "True",
              "MODEL.LONGTAIL.PCB.ALPHA", "0.2"],
    "seesaw": ["MODEL.LONGTAIL.PREDICTOR", "SeesawOutputLayers", "MODEL.LONGTAIL.CLASSIFIER", "cosine",
               "MODEL.LONGTAIL.PCB.ALPHA", "0.05"],
}


def _heads(base="ce", *opts):
    """LongTailROIHeads with PCB on a tiny FPN-like input (8 channels, 7x7 pooling, 4 classes)."""
    cfg = get_cfg()
    add_longtail_config(cfg)
    cfg.merge_from_file(QUICK)
    cfg.merge_from_list(["MODEL.LONGTAIL.PCB.ENABLED", "True",
                         "MODEL.ROI_HEADS.NUM_CLASSES", str(C), "MODEL.ROI_BOX_HEAD.FC_DIM", "16",
                         "MODEL.LONGTAIL.PCB.MLP_HIDDEN", "8", *BASES[base], *opts])
    torch.manual_seed(0)
    shapes = {f: ShapeSpec(channels=8, stride=s) for f, s in zip(["p2", "p3", "p4", "p5"], [4, 8, 16, 32])}
    return LongTailROIHeads(cfg, shapes).train()


def _features(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f: torch.randn(1, 8, 64 // s, 64 // s, generator=g) for f, s in zip(["p2", "p3", "p4", "p5"], [4, 8, 16, 32])}


def _passes(heads, box_features):
    return heads.pcb.passes(heads.box_head, heads.box_predictor, box_features)


def _box_losses(heads, labels, iteration=0, seed=0):
    with EventStorage(start_iter=iteration):
        return heads._forward_box(_features(seed), proposals_with_labels(labels))


def test_three_passes_weighted_losses_and_one_box_loss():
    heads = _heads("ce", "MODEL.LONGTAIL.PCB.START_ITER", "1000")
    losses = _box_losses(heads, [[0, 1, BG, BG]])
    assert set(losses) == {"loss_cls_step0", "loss_cls_step1", "loss_cls_step2", "loss_box_reg"}
    # The gate is closed: each pass is plain CE weighted 0.2 / 0.2 / 0.6.
    passes = _passes(heads, heads.box_pooler([_features()[f] for f in heads.box_in_features],
                                            [p.proposal_boxes for p in proposals_with_labels([[0, 1, BG, BG]])]))
    gt = torch.tensor([0, 1, BG, BG])
    for step, weight in enumerate((0.2, 0.2, 0.6)):
        ce = torch.nn.functional.cross_entropy(passes[step][0], gt)
        assert losses[f"loss_cls_step{step}"].item() == pytest.approx(weight * ce.item(), rel=1e-5)
    sum(losses.values()).backward()
    for mlp in (heads.pcb.cls_modulation, heads.pcb.box_modulation):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mlp.parameters())


def test_matrix_takes_three_updates_per_iteration_from_foreground_proposals():
    heads = _heads("ce", "MODEL.LONGTAIL.PCB.START_ITER", "1000")
    labels = [[0, 0, 2, BG, BG]]
    _box_losses(heads, labels)
    assert heads.pcb.confusion.pcb_seen.tolist() == [6.0, 0.0, 3.0, 0.0]  # 3 passes x (2, 0, 1, 0)
    rows = heads.pcb.confusion.pcb_cm.sum(1)
    assert torch.allclose(rows[[0, 2]], torch.ones(2)) and torch.all(rows[[1, 3]] == 0)
    assert not heads.pcb.confusion.pcb_cm.requires_grad


def test_active_pass_uses_the_mixed_fightback_labels():
    heads = _heads("ce", "MODEL.LONGTAIL.PCB.REQUIRE_ALL_SEEN", "False")
    labels = [[0, 1, 2, 3, BG]]
    gt = torch.tensor(labels[0])
    # Replay the passes by hand with a copy of the matrix: update, then mix, per pass.
    reference = ConfusionMatrixEMA(C, 0.99, normalized=True)
    box_features = heads.box_pooler([_features()[f] for f in heads.box_in_features],
                                    [p.proposal_boxes for p in proposals_with_labels(labels)])
    passes = _passes(heads, box_features)
    expected = []
    for step, (scores, _) in enumerate(passes):
        probs = torch.softmax(scores.detach()[:4, :C], dim=1)
        reference.update(probs, gt[:4])
        alpha = (0.0, 0.2, 0.4)[step]
        q = pcb_mixed_targets(gt, reference.fightback(gt[:4]), alpha, C)
        expected.append((0.2, 0.2, 0.6)[step] * soft_cross_entropy(scores, q))
    losses = _box_losses(heads, labels)
    for step in range(3):
        assert losses[f"loss_cls_step{step}"].item() == pytest.approx(expected[step].item(), rel=1e-5)
    assert torch.allclose(heads.pcb.confusion.pcb_cm, reference.pcb_cm)


@pytest.mark.parametrize("base", ["eqlv2", "seesaw"])
def test_other_bases_train_on_soft_labels(base):
    heads = _heads(base, "MODEL.LONGTAIL.PCB.REQUIRE_ALL_SEEN", "False")
    normalized = base == "seesaw"
    assert heads.pcb.confusion.normalized is normalized
    for iteration in range(2):
        losses = _box_losses(heads, [[0, 1, 2, 3, BG, BG]], iteration=iteration, seed=iteration)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    rows = heads.pcb.confusion.pcb_cm.sum(1)
    if normalized:
        assert torch.allclose(rows, torch.ones(C))
    else:  # sigmoid means, not renormalised: zero-init bias 1 - 0.99^k remains
        assert torch.all(rows < C)


@pytest.mark.parametrize("labels", [[[]], [[BG, BG, BG]]], ids=["empty", "all_background"])
def test_batches_without_foreground(labels):
    heads = _heads("ce", "MODEL.LONGTAIL.PCB.REQUIRE_ALL_SEEN", "False")
    losses = _box_losses(heads, labels)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert torch.all(heads.pcb.confusion.pcb_seen == 0) and torch.all(heads.pcb.confusion.pcb_cm == 0)


def test_unseen_classes_keep_it_off_unless_allowed():
    gated = _heads("ce")
    _box_losses(gated, [[0, 1, BG]])
    with EventStorage(start_iter=5):
        assert not gated.pcb.active()  # classes 2 and 3 never seen
    forced = _heads("ce", "MODEL.LONGTAIL.PCB.REQUIRE_ALL_SEEN", "False", "MODEL.LONGTAIL.PCB.START_ITER", "5")
    with EventStorage(start_iter=4):
        assert not forced.pcb.active()
    with EventStorage(start_iter=5):
        assert forced.pcb.active()


def test_inference_uses_the_last_pass():
    heads = _heads("ce").eval()
    proposals = proposals_with_labels([[0, 1, 2]])
    for p in proposals:
        p.remove("gt_classes")
        p.remove("gt_boxes")
    with torch.no_grad():
        instances = heads._forward_box(_features(), proposals)
        box_features = heads.box_pooler([_features()[f] for f in heads.box_in_features],
                                        [p.proposal_boxes for p in proposals])
        last = _passes(heads, box_features)[-1]
        expected, _ = heads.box_predictor.inference(last, proposals)
    assert torch.equal(instances[0].scores, expected[0].scores)


def test_configuration_errors():
    with pytest.raises(ValueError, match="trains on soft labels"):
        _heads("ce", "MODEL.LONGTAIL.PREDICTOR", "IIFOutputLayers", "MODEL.ROI_HEADS.NUM_CLASSES", "30")
    with pytest.raises(ValueError, match="SoftmaxCEOutputLayers"):
        _heads("ce", "MODEL.LONGTAIL.PREDICTOR", "FastRCNNOutputLayers")
    with pytest.raises(ValueError, match="one weight per pass"):
        _heads("ce", "MODEL.LONGTAIL.PCB.STEP_WEIGHTS", "[0.5, 0.5]")


def test_without_pcb_the_heads_are_the_plain_ones():
    cfg = get_cfg()
    add_longtail_config(cfg)
    cfg.merge_from_file(QUICK)
    model = build_model(cfg)
    assert model.roi_heads.pcb is None
    assert not any(k.startswith("roi_heads.pcb") for k in model.state_dict())


def _two_rank_worker(out_path):
    from detectron2.utils import comm

    rank = comm.get_rank()
    heads = _heads("ce", "MODEL.LONGTAIL.PCB.REQUIRE_ALL_SEEN", "False")
    # Rank 1 has no foreground proposal in the first iteration: it still joins every collective.
    plans = {0: [[[0, 0, 1, BG]], [[2, BG]]], 1: [[[BG, BG]], [[3, 3, 0]]]}[rank]
    for iteration, labels in enumerate(plans):
        _box_losses(heads, labels, iteration=iteration, seed=10 * rank + iteration)
    state = {k: v.tolist() for k, v in heads.pcb.confusion.state_dict().items()}
    gathered = comm.gather(state, dst=0)
    if comm.is_main_process():
        with open(out_path, "w") as f:
            json.dump(gathered, f)


def test_two_ranks_hold_identical_matrices(tmp_path):
    out = tmp_path / "ranks.json"
    launch_two_ranks(_two_rank_worker, str(out))
    rank0, rank1 = json.loads(out.read_text())
    assert rank0 == rank1  # bit-identical
    assert rank0["pcb_seen"] == [9.0, 3.0, 3.0, 6.0]  # 3 passes x the labels of both ranks


def test_state_dict_round_trip_and_the_functional_update():
    matrix = ConfusionMatrixEMA(C, 0.9, normalized=True)
    probs = torch.softmax(torch.randn(5, C), dim=1)
    labels = torch.tensor([0, 0, 1, 3, 3])
    matrix.update(probs, labels)
    cm, seen = torch.zeros(C, C), torch.zeros(C, dtype=torch.float64)
    pcb_ema_update(cm, seen, pcb_batch_statistics(probs, labels), 0.9, renormalize_rows=True)
    assert torch.equal(matrix.pcb_cm, cm) and torch.equal(matrix.pcb_seen, seen)
    assert torch.equal(matrix.fightback(labels), pcb_fightback_targets(cm, labels))
    restored = ConfusionMatrixEMA(C, 0.9, normalized=True)
    restored.load_state_dict(matrix.state_dict())
    assert torch.equal(restored.pcb_cm, matrix.pcb_cm) and torch.equal(restored.pcb_seen, matrix.pcb_seen)


class _Trainer:
    iter = 4
    max_iter = 5

    def __init__(self):
        from detectron2.utils.events import EventStorage

        self.storage = EventStorage()


def test_hook_logs_diagnostics_and_writes_the_heatmap(tmp_path):
    heads = _heads("ce", "MODEL.LONGTAIL.PCB.REQUIRE_ALL_SEEN", "False")
    _box_losses(heads, [[0, 1, 2, 3, BG]])
    stats = ClassStats(names=("a", "b", "c", "d"), instance_count=(50, 20, 3, 1), image_count=(40, 15, 3, 1),
                       frequency=("f", "c", "r", "r"), num_images=60)
    hook = PCBConfusionHook(heads.pcb, stats, str(tmp_path), period=5, checkpoint_period=100)
    hook.trainer = _Trainer()
    with hook.trainer.storage:
        hook.before_step()
        hook.after_step()
        logged = hook.trainer.storage.latest()
    assert logged["pcb/seen_fraction"][0] == 1.0
    assert logged["pcb/pairwise_bias"][0] == pytest.approx(
        float(torch.linalg.norm(heads.pcb.confusion.pcb_cm - heads.pcb.confusion.pcb_cm.t())))
    assert {"pcb/diag_r", "pcb/diag_c", "pcb/diag_f", "pcb/active"} <= set(logged)
    image = tmp_path / "pcb_confusion_0000005.png"
    assert image.is_file() and image.stat().st_size > 1000


def _pcb_args(base, *opts, resume=False):
    return default_argument_parser().parse_args(
        (["--resume"] if resume else []) + [
            "--config-file", QUICK, "MODEL.LONGTAIL.PCB.ENABLED", "True",
            "MODEL.LONGTAIL.PCB.REQUIRE_ALL_SEEN", "False", "MODEL.LONGTAIL.PCB.START_ITER", "1",
            *BASES[base], *opts]
    )


def _pcb_state(path):
    model = torch.load(path)["model"]
    return {k.split(".")[-1]: v for k, v in model.items() if k.startswith("roi_heads.pcb.confusion.")}


@pytest.mark.parametrize("base", sorted(BASES))
def test_train_net_short_run_per_base(base, tmp_path, shapes_lt_root):
    out = str(tmp_path / base)
    train_net.main(_pcb_args(base, "OUTPUT_DIR", out, "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()"))
    state = _pcb_state(os.path.join(out, "model_final.pth"))
    assert state["pcb_seen"].sum() > 0 and torch.isfinite(state["pcb_cm"]).all()
    assert (tmp_path / base / "pcb_confusion_0000002.png").is_file()
    with open(os.path.join(out, "metrics.json")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    assert records[-1]["pcb/seen_fraction"] > 0 and "pcb/pairwise_bias" in records[-1]
    if base != "ce":
        return
    # --resume restores the matrix bit-exact before training continues, then the run goes on.
    args = _pcb_args(base, "OUTPUT_DIR", out, "SOLVER.MAX_ITER", "3", "DATASETS.TEST", "()", resume=True)
    trainer = LongTailTrainer(train_net.setup(args))
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 2
    for name, value in _pcb_state(os.path.join(out, "model_final.pth")).items():
        assert torch.equal(getattr(trainer.model.roi_heads.pcb.confusion, name), value), name
    trainer.train()
    resumed = _pcb_state(os.path.join(out, "model_final.pth"))
    assert resumed["pcb_seen"].sum() > state["pcb_seen"].sum()
