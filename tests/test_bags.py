"""BAGSOutputLayers against functional/bags.py, its sampling stream, its checkpointed partition,
the decoupled stage-2 machinery (engine/decoupled.py) and a stage 1 -> stage 2 run of train_net."""
import json
import os

import pytest
import torch
from detectron2.engine import default_argument_parser
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.utils.events import EventStorage

import train_net
from predictor_helpers import FEATURES, predictor_args, proposals_with_labels
from longtail.engine.decoupled import StageTwoCheckpointer, train_only
from longtail.functional.bags import bags_layout, bags_loss, bags_partition, bags_probs
from longtail.modeling.predictors import BAGSOutputLayers
from distributed_helpers import launch_two_ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO, "configs", "quick_schedules", "ce_instant_test.yaml")
# Groups [0,10): classes 0, 2, 5 (5 has no training instance); [10,100): 1; [100,1000): 3;
# [1000, inf): 4. Background label 6.
COUNTS = [3, 50, 7, 500, 5000, 0]
BG = len(COUNTS)


def _predictor(seed=0, counts=COUNTS, **kwargs):
    torch.manual_seed(0)
    return BAGSOutputLayers(**predictor_args(len(counts)), instance_counts=counts, seed=seed, **kwargs)


def _losses(predictor, labels, features=None, iteration=0):
    proposals = proposals_with_labels(labels)
    num = sum(len(p) for p in proposals)
    if features is None:
        features = torch.randn(num, FEATURES, generator=torch.Generator().manual_seed(1))
    with EventStorage(start_iter=iteration) as storage:
        predictions = predictor(features)
        losses = predictor.losses(predictions, proposals)
    return losses, predictions, storage


def test_classifier_has_the_grouped_layout():
    predictor = _predictor()
    layout = bags_layout(bags_partition(torch.tensor(COUNTS, dtype=torch.float64)))
    assert predictor.cls_score.out_features == layout.num_logits == len(COUNTS) + 4 + 2
    assert predictor.bbox_pred.out_features == 4 * len(COUNTS)  # regression stays per class
    assert predictor.bags_partition.tolist() == [1, 2, 1, 3, 4, 1]


def test_loss_is_the_functional_loss_with_the_same_draws():
    predictor = _predictor(seed=3)
    # 1 positive of group [0,10) among many others: the "others" of that group are subsampled.
    labels = [[0] + [BG] * 20 + [1] * 2]
    losses, (scores, _), storage = _losses(predictor, labels, iteration=7)
    gt = torch.tensor(labels[0])
    generator = torch.Generator().manual_seed(hash((3, 0, 7)) % (2**63))
    expected = bags_loss(scores, gt, predictor.layout, 8.0, generator)
    assert losses["loss_cls"].item() == pytest.approx(expected.sum().item(), rel=1e-6)
    logged = storage.latest()
    for n, value in enumerate(expected.tolist()):
        assert logged[f"bags/loss_group{n}"][0] == pytest.approx(value, rel=1e-6)
    # The accuracy is read from the merged class scores, not from an argmax over group logits.
    merged = bags_probs(scores.detach(), predictor.layout)
    accuracy = (merged.argmax(dim=1) == gt).float().mean().item()
    assert logged["fast_rcnn/cls_accuracy"][0] == pytest.approx(accuracy)


def test_sampling_depends_on_seed_and_iteration_only():
    labels = [[0] + [BG] * 40]
    first, _, _ = _losses(_predictor(seed=1), labels, iteration=5)
    again, _, _ = _losses(_predictor(seed=1), labels, iteration=5)
    assert first["loss_cls"].item() == again["loss_cls"].item()
    other_iters = {_losses(_predictor(seed=1), labels, iteration=i)[0]["loss_cls"].item() for i in range(6)}
    assert len(other_iters) > 1


def test_box_regression_loss_is_upstream():
    predictor = _predictor()
    stock = FastRCNNOutputLayers(**predictor_args(len(COUNTS)))
    stock.bbox_pred.load_state_dict(predictor.bbox_pred.state_dict())
    labels = [[0, 3, BG], [4, BG]]
    features = torch.randn(5, FEATURES)
    ours, _, _ = _losses(predictor, labels, features)
    with EventStorage():
        theirs = stock.losses(stock(features), proposals_with_labels(labels))
    assert ours["loss_box_reg"].item() == pytest.approx(theirs["loss_box_reg"].item(), rel=1e-6)


def test_inference_scores_are_the_merged_probabilities():
    predictor = _predictor()
    proposals = proposals_with_labels([[0, 1, 2], [BG]])
    predictions = predictor(torch.randn(4, FEATURES))
    probs = torch.cat(predictor.predict_probs(predictions, proposals)).detach()
    assert probs.shape == (4, len(COUNTS) + 1)
    assert torch.allclose(probs, bags_probs(predictions[0].detach(), predictor.layout))
    assert torch.all((probs >= 0) & (probs <= 1))
    instances, _ = predictor.inference(predictions, proposals)
    assert all(bool((inst.pred_classes < len(COUNTS)).all()) for inst in instances)


@pytest.mark.parametrize("labels", [[[]], [[BG, BG, BG], [BG]], [[5, 5]]],
                         ids=["empty", "all_background", "zero_count_class"])
def test_degenerate_batches_are_finite_and_backprop(labels):
    predictor = _predictor()
    losses, _, _ = _losses(predictor, labels)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(predictor.cls_score.weight.grad).all()


def test_a_checkpoint_with_other_groups_is_refused():
    trained = _predictor()
    same = _predictor()
    same.load_state_dict(trained.state_dict())
    moved = _predictor(counts=[3, 50, 7, 500, 50, 0])  # class 4 in another group: same width
    with pytest.raises(ValueError, match="class_stats.json"):
        moved.load_state_dict(trained.state_dict())


def _two_rank_worker(out_path):
    from detectron2.utils import comm

    losses, _, _ = _losses(_predictor(seed=0), [[0] + [BG] * 40], iteration=2)
    gathered = comm.gather(losses["loss_cls"].item(), dst=0)
    if comm.is_main_process():
        with open(out_path, "w") as f:
            json.dump(gathered, f)


def test_ranks_draw_their_own_others(tmp_path):
    out = tmp_path / "ranks.json"
    launch_two_ranks(_two_rank_worker, str(out))
    rank0, rank1 = json.loads(out.read_text())
    # Identical inputs on both ranks: only the rank-local draw differs.
    assert rank0 != rank1
    alone, _, _ = _losses(_predictor(seed=0), [[0] + [BG] * 40], iteration=2)
    assert alone["loss_cls"].item() == pytest.approx(rank0, rel=1e-6)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
        self.head = torch.nn.Linear(2, 3)


def test_train_only_freezes_the_rest_and_its_batchnorms():
    model = _Tiny()
    assert train_only(model, ["head"]) == ["head.weight", "head.bias"]
    assert not any(p.requires_grad for p in model.body.parameters())
    assert isinstance(model.body[1], FrozenBatchNorm2d)
    with pytest.raises(ValueError, match="'heads' matches no parameter"):
        train_only(_Tiny(), ["heads"])


def test_stage_two_checkpointer_errors(tmp_path):
    model = _Tiny()
    with pytest.raises(ValueError, match="REINIT entry 'head.w' matches no"):
        StageTwoCheckpointer(model, str(tmp_path), reinit=["head.w"])
    checkpointer = StageTwoCheckpointer(model, str(tmp_path), reinit=["head"])
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty"):
        checkpointer.resume_or_load("", resume=False)
    partial = tmp_path / "partial.pth"
    torch.save({"model": {"head.weight": torch.zeros(3, 2)}}, partial)
    with pytest.raises(ValueError, match=r"lacks 4 parameters \(e.g. body.0.weight"):
        checkpointer.resume_or_load(str(partial), resume=False)


def _run(config_opts, resume=False):
    args = default_argument_parser().parse_args(
        (["--resume"] if resume else []) + ["--config-file", QUICK, *config_opts]
    )
    return train_net.main(args)


_STAGE_TWO = [
    "MODEL.LONGTAIL.PREDICTOR", "BAGSOutputLayers",
    "MODEL.LONGTAIL.DECOUPLED.REINIT", "['roi_heads.box_predictor.cls_score']",
    "MODEL.LONGTAIL.DECOUPLED.TRAIN_ONLY", "['roi_heads.box_predictor.cls_score']",
]


def _reinit_reports(out_dir):
    with open(os.path.join(out_dir, "log.txt")) as f:
        return [line.split("REINIT): ", 1)[1].strip() for line in f if "Re-initialised" in line]


def test_stage_one_then_stage_two_through_train_net(tmp_path, shapes_lt_root):
    stage1 = str(tmp_path / "stage1")
    _run(["OUTPUT_DIR", stage1, "SOLVER.MAX_ITER", "3", "DATASETS.TEST", "()"])
    stage1_weights = os.path.join(stage1, "model_final.pth")

    stage2 = str(tmp_path / "stage2")
    _run(["OUTPUT_DIR", stage2, "MODEL.WEIGHTS", stage1_weights, "SOLVER.MAX_ITER", "3",
          "DATASETS.TEST", "()", *_STAGE_TWO])
    # 30 classes, three non-empty groups (13/10/7 classes), G0: 30 + 3 + 2 logits.
    assert _reinit_reports(stage2) == [
        "roi_heads.box_predictor.cls_score.weight (35, 256), roi_heads.box_predictor.cls_score.bias (35,)"
    ]

    before = torch.load(stage1_weights)["model"]
    after = torch.load(os.path.join(stage2, "model_final.pth"))["model"]
    changed = {k for k in after if k not in before or not torch.equal(after[k], before[k])}
    # Everything but the new classifier is the stage-1 model, BatchNorm statistics included.
    assert changed == {"roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
                       "roi_heads.box_predictor.bags_partition"}

    # --resume loads the stage-2 checkpoint in full: nothing is re-initialised again.
    _run(["OUTPUT_DIR", stage2, "MODEL.WEIGHTS", stage1_weights, "SOLVER.MAX_ITER", "4",
          "DATASETS.TEST", "()", *_STAGE_TWO], resume=True)
    assert len(_reinit_reports(stage2)) == 1
    assert torch.load(os.path.join(stage2, "model_final.pth"))["iteration"] == 3

    # The stage-2 model evaluates with --eval-only (its classifier loaded, not re-initialised).
    results = train_net.main(default_argument_parser().parse_args(
        ["--config-file", QUICK, "--eval-only", "OUTPUT_DIR", str(tmp_path / "eval"),
         "MODEL.WEIGHTS", os.path.join(stage2, "model_final.pth"), *_STAGE_TWO]))
    assert 0.0 <= results["bbox"]["AP"] <= 100.0
    assert not os.path.exists(os.path.join(str(tmp_path / "eval"), "log.txt")) or not _reinit_reports(
        str(tmp_path / "eval"))
