"""SeesawOutputLayers: the predictor against functional/seesaw.py and the spec's worked example, the
cumulative RoI counts (timing, training only, checkpoints, two ranks with and without sync),
inference, empty batches, and a short train_net run that resumes."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.engine import default_argument_parser
from detectron2.utils.events import EventStorage

import train_net
from predictor_helpers import FEATURES, predictor_args, proposals_with_labels
from predictor_helpers import flat_labels as _gt
from predictor_helpers import predictor_losses as _losses
from predictor_helpers import random_features as _features
from longtail.engine import LongTailTrainer
from longtail.functional.seesaw import seesaw_class_probs, seesaw_loss, seesaw_probs
from longtail.modeling.classifiers import CosineLinear
from longtail.modeling.predictors import LONGTAIL_PREDICTOR_REGISTRY, SeesawOutputLayers
from longtail.modeling.predictors import seesaw as seesaw_module
from distributed_helpers import launch_two_ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO, "configs", "quick_schedules", "ce_instant_test.yaml")
C = 3
BG = C
LOSS_KEYS = {"loss_cls_classes", "loss_cls_objectness"}


def _predictor(classifier="linear", **kwargs):
    torch.manual_seed(0)
    return SeesawOutputLayers(**predictor_args(C), classifier=classifier, **kwargs)





def _counts(values):
    return torch.tensor(values, dtype=torch.float64)


def test_registered_layout_and_buffer():
    assert LONGTAIL_PREDICTOR_REGISTRY.get("SeesawOutputLayers") is SeesawOutputLayers
    for classifier, layer in (("linear", torch.nn.Linear), ("cosine", CosineLinear)):
        predictor = _predictor(classifier, cosine_scale=20.0)
        assert isinstance(predictor.cls_score, layer)
        assert predictor.cls_score.out_features == C + 2  # classes, then [object, background]
        assert predictor.bbox_pred.out_features == 4 * C  # regression stays per class
    buffer = predictor.seesaw_cum_samples
    assert buffer.dtype == torch.float64 and buffer.shape == (C + 1,) and not buffer.requires_grad
    assert "seesaw_cum_samples" in predictor.state_dict()
    assert predictor.cls_score.scale == 20.0


def test_worked_example_full_loss():
    # Spec §6 Ex 4 through the predictor: the batch's labels are counted before its own loss.
    predictor = _predictor()
    predictor.seesaw_cum_samples.copy_(_counts([50, 5, 0, 200]))
    z = torch.tensor(
        [[2, 0.5, -1, 1, -1], [0.5, 1.5, 0, 0.5, 0], [0, 0, 0, -1, 2]], dtype=torch.float64
    ).requires_grad_(True)
    labels = torch.tensor([0, 2, BG])
    with EventStorage():
        losses = predictor.classification_loss(z, labels)
    assert set(losses) == LOSS_KEYS
    assert predictor.seesaw_cum_samples.tolist() == [51, 5, 1, 201]
    assert losses["loss_cls_classes"].item() == pytest.approx(1.531800, abs=1e-6)
    assert losses["loss_cls_objectness"].item() == pytest.approx(0.216531, abs=1e-6)
    sum(losses.values()).backward()
    assert z.grad[2, :C].tolist() == [0.0, 0.0, 0.0]  # a bg row trains only objectness
    assert z.grad[2, C:].tolist() == pytest.approx([0.015809, -0.015809], abs=1e-6)
    expected = [
        [0.691952, 0.154395, 0.034450, 0.119203],
        [0.143927, 0.391235, 0.087296, 0.377541],
        [0.015809, 0.015809, 0.015809, 0.952574],
    ]
    probs = predictor.class_probs(z.detach())
    for row, want in zip(probs.tolist(), expected):
        assert row == pytest.approx(want, abs=1e-6)
    with EventStorage():
        again = predictor.classification_loss(z.detach(), labels)
    assert predictor.seesaw_cum_samples.tolist() == [52, 5, 2, 202]
    assert again["loss_cls_classes"].item() == pytest.approx(1.532119, abs=1e-6)


def test_loss_is_the_functional_loss_with_the_configured_counts():
    predictor = _predictor("cosine", p=0.6, q=1.5, eps=0.05)
    before = _counts([40, 3, 0, 500])
    predictor.seesaw_cum_samples.copy_(before)
    labels = [[0, BG, 1, 1], [2, BG, BG]]
    losses, (scores, _) = _losses(predictor, labels)
    assert set(losses) == LOSS_KEYS | {"loss_box_reg"}
    # The buffer grew by exactly the label histogram, and the loss used the grown counts.
    after = before + _counts([1, 2, 1, 3])
    assert torch.equal(predictor.seesaw_cum_samples, after)
    expected = seesaw_loss(scores, _gt(labels), after, p=0.6, q=1.5, eps=0.05)
    assert torch.equal(losses["loss_cls_classes"], expected.classes)
    assert torch.equal(losses["loss_cls_objectness"], expected.objectness)
    sum(losses.values()).backward()
    assert predictor.cls_score.weight.grad.abs().sum() > 0


def test_soft_class_targets_reach_the_class_term():
    # PCB's Seesaw variant: soft targets in the class CE, factors from the hard labels.
    predictor = _predictor()
    scores = torch.randn(3, C + 2, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 1, BG])
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.9, 0.1], [0.0, 0.0, 0.0]])
    # (R, C+1) soft labels, background last; the class term reads their class columns.
    background = torch.tensor([[0.0], [0.0], [1.0]])
    with EventStorage():
        losses = predictor.classification_loss(scores, labels, soft_targets=torch.cat([soft, background], 1))
    expected = seesaw_loss(scores, labels, _counts([1, 1, 0, 1]), class_targets=soft)
    assert torch.equal(losses["loss_cls_classes"], expected.classes)
    assert torch.equal(predictor.foreground_class_probs(scores), seesaw_class_probs(scores))


def test_evaluation_does_not_count():
    trained = _predictor()
    evaluated = _predictor()
    evaluated.eval()
    training_losses, _ = _losses(trained, [[0, 1, BG]])
    eval_losses, _ = _losses(evaluated, [[0, 1, BG]])
    assert evaluated.seesaw_cum_samples.tolist() == [0, 0, 0, 0]
    # The same loss as a training call would give (the batch counts itself), buffer untouched.
    for key in LOSS_KEYS:
        assert torch.equal(eval_losses[key], training_losses[key])


def test_predict_probs_background_last_and_rows_sum_to_one():
    predictor = _predictor("cosine")
    predictor.eval()
    proposals = proposals_with_labels([[BG, 0, 1], [2, BG]])
    with torch.no_grad():
        predictions = predictor(_features(5))
        probs = torch.cat(predictor.predict_probs(predictions, proposals))
    scores = predictions[0]
    assert scores.shape == (5, C + 2) and probs.shape == (5, C + 1)
    assert torch.allclose(probs.sum(dim=1), torch.ones(5))
    assert torch.allclose(probs[:, -1], scores[:, C:].softmax(dim=1)[:, 1])
    assert torch.equal(probs, seesaw_probs(scores))
    assert torch.all(probs >= 0)
    instances, _ = predictor.inference(predictions, proposals)
    assert len(instances) == 2 and all(torch.all(i.scores <= 1) for i in instances)
    assert all(torch.all(i.pred_classes < C) for i in instances)


@pytest.mark.parametrize("labels", [[[]], [[BG, BG, BG], [BG]]], ids=["empty", "all_background"])
def test_empty_and_all_background_batches_backprop_and_still_reduce(labels, monkeypatch):
    calls = []

    def counting_all_reduce(tensor):
        calls.append(tuple(tensor.shape))
        return tensor.clone()

    monkeypatch.setattr(seesaw_module, "all_reduce_sum", counting_all_reduce)
    predictor = _predictor()
    losses, _ = _losses(predictor, labels)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(predictor.cls_score.weight.grad).all()
    classes = losses["loss_cls_classes"]
    assert classes.item() == 0.0 and classes.grad_fn is not None
    assert calls == [(C + 1,)]  # one collective per training call, whatever the batch holds
    num_bg = sum(len(image) for image in labels)
    assert predictor.seesaw_cum_samples.tolist() == [0, 0, 0, num_bg]
    if num_bg:
        assert losses["loss_cls_objectness"].item() > 0


def test_no_collective_without_sync():
    calls = []
    predictor = _predictor(sync_counts=False)
    original = seesaw_module.all_reduce_sum
    seesaw_module.all_reduce_sum = lambda t: calls.append(t) or t.clone()
    try:
        _losses(predictor, [[0, BG]])
    finally:
        seesaw_module.all_reduce_sum = original
    assert calls == [] and predictor.seesaw_cum_samples.tolist() == [1, 0, 0, 1]


def test_classes_never_seen_stay_finite():
    predictor = _predictor()
    for step in range(3):  # classes 1 and 2 never appear: count 0, clamped to 1 by the loss
        losses, _ = _losses(predictor, [[0, 0, BG]], seed=step)
        total = sum(losses.values())
        assert torch.isfinite(total)
        total.backward()
    assert predictor.seesaw_cum_samples.tolist() == [6, 0, 0, 3]
    assert torch.isfinite(predictor.cls_score.weight.grad).all()


def test_checkpoint_round_trip_continues_the_counts_bit_exactly():
    batches = [[[0, BG, 1]], [[2, BG], [BG, 0]], [[1, 0, BG]]]
    uninterrupted = _predictor()
    for step, labels in enumerate(batches):
        uninterrupted_losses, _ = _losses(uninterrupted, labels, seed=step)

    first = _predictor()
    for step, labels in enumerate(batches[:2]):
        _losses(first, labels, seed=step)
    resumed = SeesawOutputLayers(**predictor_args(C))  # other random weights, zero counts
    resumed.load_state_dict({k: v.clone() for k, v in first.state_dict().items()})
    assert resumed.seesaw_cum_samples.dtype == torch.float64
    assert torch.equal(resumed.seesaw_cum_samples, first.seesaw_cum_samples)
    resumed_losses, _ = _losses(resumed, batches[2], seed=2)
    for key in LOSS_KEYS:
        assert torch.equal(resumed_losses[key], uninterrupted_losses[key])
    assert torch.equal(resumed.seesaw_cum_samples, uninterrupted.seesaw_cum_samples)


# Rank 1 has no RoI at all in its first call; both ranks see different classes.
_RANK_BATCHES = ([[[0, BG, BG], [1, BG]], [[0, 0, BG]]], [[[]], [[2, BG], [BG]]])


def _two_rank_worker(out_path):
    from detectron2.utils import comm

    rank = comm.get_rank()
    synced, local = _predictor(sync_counts=True), _predictor(sync_counts=False)
    for step, labels in enumerate(_RANK_BATCHES[rank]):
        for predictor in (synced, local):
            _losses(predictor, labels, seed=10 * rank + step)
    counts = {
        "synced": synced.seesaw_cum_samples.tolist(),
        "local": local.seesaw_cum_samples.tolist(),
    }
    gathered = comm.gather(counts, dst=0)
    if comm.is_main_process():
        with open(out_path, "w") as f:
            json.dump(gathered, f)


def test_two_ranks_sync_counts_or_keep_their_own(tmp_path):
    out = tmp_path / "ranks.json"
    launch_two_ranks(_two_rank_worker, str(out))
    ranks = json.loads(out.read_text())
    histogram = [
        F.one_hot(_gt([c for batch in batches for c in batch]), C + 1).sum(dim=0).double().tolist()
        for batches in _RANK_BATCHES
    ]
    assert histogram == [[3, 1, 0, 4], [0, 0, 1, 2]]
    # SYNC_COUNTS: identical global counts on both ranks; otherwise each rank's own (reference).
    assert ranks[0]["synced"] == ranks[1]["synced"] == [3, 1, 1, 6]
    assert [r["local"] for r in ranks] == histogram


def _args(out, max_iter, resume=False):
    return default_argument_parser().parse_args(
        (["--resume"] if resume else [])
        + [
            "--config-file", QUICK,
            "MODEL.LONGTAIL.PREDICTOR", "SeesawOutputLayers",
            "MODEL.LONGTAIL.CLASSIFIER", "cosine",
            "MODEL.ROI_MASK_HEAD.NAME", "CosineMaskRCNNConvUpsampleHead",
            "SOLVER.MAX_ITER", str(max_iter),
            "DATASETS.TEST", "()",
            "OUTPUT_DIR", out,
        ]
    )


def _saved_counts(out):
    model = torch.load(os.path.join(out, "model_final.pth"))["model"]
    return model["roi_heads.box_predictor.seesaw_cum_samples"]


def test_train_net_saves_and_resumes_the_counts(tmp_path, shapes_lt_root):
    out = str(tmp_path / "seesaw")
    train_net.main(_args(out, 2))
    counts = _saved_counts(out)
    assert counts.dtype == torch.float64 and counts[-1] > 0 and counts[:-1].sum() > 0
    assert torch.equal(counts, counts.round())  # whole RoIs

    # Resume: the trainer starts from the checkpoint's counts, then keeps adding to them.
    trainer = LongTailTrainer(train_net.setup(_args(out, 4, resume=True)))
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 2
    predictor = trainer.model.roi_heads.box_predictor
    assert isinstance(predictor, SeesawOutputLayers)
    assert torch.equal(predictor.seesaw_cum_samples, counts)
    trainer.train()
    resumed = _saved_counts(out)
    assert torch.all(resumed >= counts) and resumed[-1] > counts[-1]
