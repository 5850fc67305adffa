"""EQLv2OutputLayers: the predictor against functional/eqlv2.py and the spec's worked examples, the
gradient statistics (timing, training only, checkpoints, two ranks), inference, empty batches,
and a short train_net run that resumes."""
import json
import math
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
from longtail.functional.eqlv2 import eqlv2_grad_increments, eqlv2_loss, eqlv2_probs, eqlv2_weights
from longtail.modeling.predictors import LONGTAIL_PREDICTOR_REGISTRY, EQLv2OutputLayers
from longtail.modeling.predictors import eqlv2 as eqlv2_module
from distributed_helpers import launch_two_ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO, "configs", "quick_schedules", "ce_instant_test.yaml")
C = 3
BG = C
PRIOR_BIAS = -math.log(999.0)  # pi = 0.001


def _predictor(classifier="linear", num_classes=C, **kwargs):
    torch.manual_seed(0)
    return EQLv2OutputLayers(**predictor_args(num_classes), classifier=classifier, **kwargs)




def _stats(predictor):
    return predictor.eqlv2_pos_grad.clone(), predictor.eqlv2_neg_grad.clone()



def test_registered_buffers_and_prior_bias():
    assert LONGTAIL_PREDICTOR_REGISTRY.get("EQLv2OutputLayers") is EQLv2OutputLayers
    for classifier in ("linear", "cosine"):
        predictor = _predictor(classifier)
        assert predictor.cls_score.out_features == C + 1
        assert predictor.bbox_pred.out_features == 4 * C
        assert torch.allclose(predictor.cls_score.bias, torch.full((C + 1,), PRIOR_BIAS))
        for name in ("eqlv2_pos_grad", "eqlv2_neg_grad"):
            buffer = dict(predictor.named_buffers())[name]
            assert buffer.dtype == torch.float64 and buffer.shape == (C,)
            assert not buffer.requires_grad and name in predictor.state_dict()


@pytest.mark.parametrize("classifier", ["linear", "cosine"])
def test_prior_bias_gives_the_spec_initial_loss_on_lvis(classifier):
    # Spec Ex C: C = 1203, every column at the prior bias: 8.111357 per RoI, fg or bg. A zero
    # feature leaves exactly the bias in both classifiers.
    predictor = _predictor(classifier, num_classes=1203)
    scores = predictor.cls_score(torch.zeros(2, FEATURES))
    with EventStorage():
        loss = predictor.classification_loss(scores.double(), torch.tensor([5, 1203]))
    assert loss.item() == pytest.approx(8.111357, abs=1e-5)


def test_worked_example_two_steps():
    # Spec §6 Ex A, through the predictor: unit weights first, then the statistics of step 1.
    predictor = _predictor()
    z1 = torch.tensor([[1, -1, -2, -1.5], [-1, 0.5, -0.5, -1], [-2, -1, 0, 0.5]]).double()
    z2 = torch.tensor([[0.5, -0.5, -1, -2], [-0.5, -1, 1, -1], [-1, -2, -1, 1]]).double()
    z2.requires_grad_(True)
    pos, neg = predictor.eqlv2_pos_grad, predictor.eqlv2_neg_grad
    with EventStorage():
        first = predictor.classification_loss(z1, torch.tensor([0, 1, BG]))
        assert first.item() == pytest.approx(1.378985, abs=1e-6)
        assert pos.tolist() == pytest.approx([0.268941, 0.377541, 0.0], abs=1e-6)
        assert neg.tolist() == pytest.approx([0.388144, 0.537883, 0.996744], abs=1e-6)
        weights = predictor.current_weights()
        assert weights.neg.tolist() == pytest.approx([0.216647, 0.235559, 6.7724e-5, 1.0], abs=1e-6)
        assert weights.pos.tolist() == pytest.approx([4.133414, 4.057765, 4.999729, 1.0], abs=1e-6)
        second = predictor.classification_loss(z2, torch.tensor([0, 2, BG]))
    assert second.item() == pytest.approx(1.555071, abs=1e-6)
    second.backward()
    assert z2.grad[0, 0].item() == pytest.approx(-0.520177, abs=1e-6)
    assert z2.grad[1, 2].item() == pytest.approx(-0.448211, abs=1e-6)
    assert pos.tolist() == pytest.approx([1.829473, 0.377541, 1.344634], abs=1e-6)
    assert neg.tolist() == pytest.approx([0.528202, 0.718247, 0.996780], abs=1e-6)


def test_first_call_has_unit_weights_and_is_plain_bce():
    predictor = _predictor()
    weights = predictor.current_weights()
    assert torch.equal(weights.pos, torch.ones(C + 1, dtype=torch.float64))
    assert torch.equal(weights.neg, torch.ones(C + 1, dtype=torch.float64))
    labels = [[0, BG, 2], [BG]]
    losses, (scores, _) = _losses(predictor, labels)
    target = F.one_hot(_gt(labels), C + 1).float()
    plain = F.binary_cross_entropy_with_logits(scores, target, reduction="sum") / 4
    assert losses["loss_cls"].item() == pytest.approx(plain.item(), rel=1e-5)


def test_loss_and_update_are_the_functional_ones_with_the_configured_statistics():
    predictor = _predictor(gamma=10.0, mu=0.7, alpha=3.0)
    pos = torch.tensor([0.5, 2.0, 0.0], dtype=torch.float64)
    neg = torch.tensor([1.0, 1.5, 3.0], dtype=torch.float64)
    predictor.eqlv2_pos_grad.copy_(pos)
    predictor.eqlv2_neg_grad.copy_(neg)
    labels = [[0, BG, BG, 1], [2, BG]]
    losses, (scores, _) = _losses(predictor, labels)
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    # The weights come from the statistics before this call (spec §2.3 timing) ...
    weights = eqlv2_weights(pos, neg, 10.0, 0.7, 3.0)
    gt = _gt(labels)
    assert torch.equal(losses["loss_cls"], eqlv2_loss(scores, gt, weights.pos, weights.neg))
    # ... and the statistics then grow by exactly this call's functional increments.
    inc = eqlv2_grad_increments(scores, gt, weights.pos, weights.neg)
    assert torch.equal(predictor.eqlv2_pos_grad, pos + inc.pos.double())
    assert torch.equal(predictor.eqlv2_neg_grad, neg + inc.neg.double())
    losses["loss_cls"].backward()
    assert predictor.cls_score.weight.grad.abs().sum() > 0


def test_soft_targets_drive_the_loss_and_the_statistics():
    # PCB's EQL v2 variant passes dense (R, C+1) targets instead of the labels' one-hot.
    predictor = _predictor()
    predictor.eqlv2_pos_grad.fill_(1.0)
    predictor.eqlv2_neg_grad.fill_(2.0)
    scores = torch.randn(3, C + 1, generator=torch.Generator().manual_seed(5))
    soft = torch.tensor([[0.8, 0.1, 0.1, 0.0], [0.0, 0.6, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    weights = predictor.current_weights()
    with EventStorage():
        loss = predictor.classification_loss(scores, torch.tensor([0, 1, BG]), soft_targets=soft)
    assert torch.equal(loss, eqlv2_loss(scores, soft, weights.pos, weights.neg))
    inc = eqlv2_grad_increments(scores, soft, weights.pos, weights.neg)
    assert torch.equal(predictor.eqlv2_pos_grad, 1.0 + inc.pos.double())


def test_evaluation_does_not_update_the_statistics():
    predictor = _predictor()
    _losses(predictor, [[0, BG]])
    before = _stats(predictor)
    predictor.eval()
    losses, _ = _losses(predictor, [[1, 2, BG]])
    assert torch.isfinite(losses["loss_cls"])
    assert all(torch.equal(a, b) for a, b in zip(before, _stats(predictor)))


def test_predict_probs_are_objectness_weighted_sigmoids_background_last():
    predictor = _predictor(classifier="cosine")
    predictor.eval()
    proposals = proposals_with_labels([[BG, 0], [1, BG, 2]])
    with torch.no_grad():
        predictions = predictor(_features(5))
        probs = torch.cat(predictor.predict_probs(predictions, proposals))
    scores = predictions[0]
    assert probs.shape == (5, C + 1)
    assert torch.allclose(probs[:, :-1], scores[:, :-1].sigmoid() * (1 - scores[:, -1:].sigmoid()))
    assert torch.allclose(probs[:, -1], scores[:, -1].sigmoid())
    assert torch.all((probs >= 0) & (probs <= 1))
    instances, _ = predictor.inference(predictions, proposals)
    assert len(instances) == 2 and all(torch.all(i.scores <= 1) for i in instances)
    # Spec Ex B, and the raw sigmoid without objectness.
    z = torch.tensor([[2.0, -1.0, 0.5, -2.0], [0.0, 0.0, 0.0, 3.0]], dtype=torch.float64)
    expected = [[0.775803, 0.236883, 0.548260, 0.119203], [0.023713, 0.023713, 0.023713, 0.952574]]
    assert predictor.class_probs(z).tolist()[0] == pytest.approx(expected[0], abs=1e-6)
    assert predictor.class_probs(z).tolist()[1] == pytest.approx(expected[1], abs=1e-6)
    raw = _predictor(test_with_obj=False)
    assert torch.equal(raw.class_probs(z), z.sigmoid())
    assert torch.equal(predictor.foreground_class_probs(z), eqlv2_probs(z, False)[:, :C])


@pytest.mark.parametrize("labels", [[[]], [[BG, BG, BG], [BG]]], ids=["empty", "all_background"])
def test_empty_and_all_background_batches_backprop_and_still_reduce(labels, monkeypatch):
    calls = []

    def counting_all_reduce(tensor):
        calls.append(tuple(tensor.shape))
        return tensor.clone()

    monkeypatch.setattr(eqlv2_module, "all_reduce_sum", counting_all_reduce)
    predictor = _predictor()
    _losses(predictor, [[0, 1, BG]], seed=1)
    pos, neg = _stats(predictor)
    losses, _ = _losses(predictor, labels)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(predictor.cls_score.weight.grad).all()
    # One (2, C) collective per training call, whatever the batch holds.
    assert calls == [(2, C), (2, C)]
    assert torch.equal(predictor.eqlv2_pos_grad, pos)  # no positives: P unchanged
    if labels == [[]]:
        assert torch.equal(predictor.eqlv2_neg_grad, neg)
    else:
        assert torch.all(predictor.eqlv2_neg_grad > neg)


def test_classes_never_seen_stay_finite():
    predictor = _predictor()
    for step in range(3):
        losses, _ = _losses(predictor, [[0, BG, BG]], seed=step)  # classes 1 and 2 never positive
        assert torch.isfinite(losses["loss_cls"])
        losses["loss_cls"].backward()
    weights = predictor.current_weights()
    assert torch.isfinite(weights.pos).all() and torch.isfinite(weights.neg).all()
    assert predictor.eqlv2_pos_grad[1:].tolist() == [0.0, 0.0]
    assert weights.pos[1:C].tolist() == pytest.approx([5.0, 5.0], abs=1e-3)  # q(g = 0) ~ 5
    assert torch.isfinite(predictor.cls_score.weight.grad).all()


def test_checkpoint_round_trip_continues_the_statistics_bit_exactly():
    batches = [[[0, BG, 1]], [[2, BG], [BG, 0]], [[1, 1, BG]]]
    uninterrupted = _predictor()
    for step, labels in enumerate(batches):
        uninterrupted_losses, _ = _losses(uninterrupted, labels, seed=step)

    first = _predictor()
    for step, labels in enumerate(batches[:2]):
        _losses(first, labels, seed=step)
    state = {k: v.clone() for k, v in first.state_dict().items()}
    resumed = EQLv2OutputLayers(**predictor_args(C))  # other random weights, zero statistics
    resumed.load_state_dict(state)
    for name in ("eqlv2_pos_grad", "eqlv2_neg_grad"):
        assert getattr(resumed, name).dtype == torch.float64
        assert torch.equal(getattr(resumed, name), getattr(first, name))
    resumed_losses, _ = _losses(resumed, batches[2], seed=2)
    assert torch.equal(resumed_losses["loss_cls"], uninterrupted_losses["loss_cls"])
    assert torch.equal(resumed.eqlv2_pos_grad, uninterrupted.eqlv2_pos_grad)
    assert torch.equal(resumed.eqlv2_neg_grad, uninterrupted.eqlv2_neg_grad)


# Rank 1 has no RoI at all in its first call; both ranks see different classes.
_RANK_BATCHES = ([[[0, BG, BG], [1, BG]], [[0, 0, BG]]], [[[]], [[2, BG], [BG]]])


def _two_rank_worker(out_path):
    from detectron2.utils import comm

    rank = comm.get_rank()
    predictor = _predictor()  # seeded: identical weights on both ranks
    local = []
    for step, labels in enumerate(_RANK_BATCHES[rank]):
        weights = predictor.current_weights()
        losses, (scores, _) = _losses(predictor, labels, seed=10 * rank + step)
        inc = eqlv2_grad_increments(scores, _gt(labels), weights.pos, weights.neg)
        local.append(torch.stack(inc).double().tolist())
    state = {k: v.tolist() for k, v in predictor.state_dict().items() if k.startswith("eqlv2_")}
    gathered = comm.gather({"state": state, "increments": local}, dst=0)
    if comm.is_main_process():
        with open(out_path, "w") as f:
            json.dump(gathered, f)


def test_two_ranks_hold_identical_statistics_equal_to_the_sum(tmp_path):
    out = tmp_path / "ranks.json"
    launch_two_ranks(_two_rank_worker, str(out))
    ranks = json.loads(out.read_text())
    assert ranks[0]["state"] == ranks[1]["state"]
    # The sum of both ranks' increments (each from the same, synchronised pre-step weights).
    total = sum(torch.tensor(r["increments"], dtype=torch.float64).sum(dim=0) for r in ranks)
    assert ranks[0]["state"]["eqlv2_pos_grad"] == pytest.approx(total[0].tolist(), rel=1e-12)
    assert ranks[0]["state"]["eqlv2_neg_grad"] == pytest.approx(total[1].tolist(), rel=1e-12)
    assert all(v > 0 for v in total[0].tolist())  # every class was a positive on some rank


def _args(out, max_iter, resume=False):
    return default_argument_parser().parse_args(
        (["--resume"] if resume else [])
        + [
            "--config-file", QUICK,
            "MODEL.LONGTAIL.PREDICTOR", "EQLv2OutputLayers",
            "SOLVER.MAX_ITER", str(max_iter),
            "DATASETS.TEST", "()",
            "OUTPUT_DIR", out,
        ]
    )


def _saved_stats(out):
    model = torch.load(os.path.join(out, "model_final.pth"))["model"]
    prefix = "roi_heads.box_predictor."
    return model[prefix + "eqlv2_pos_grad"], model[prefix + "eqlv2_neg_grad"]


def test_train_net_saves_and_resumes_the_statistics(tmp_path, shapes_lt_root):
    out = str(tmp_path / "eqlv2")
    train_net.main(_args(out, 2))
    pos, neg = _saved_stats(out)
    assert pos.dtype == torch.float64 and torch.all(neg > 0) and pos.sum() > 0

    # Resume: the trainer starts from the checkpoint's statistics, then keeps adding to them.
    trainer = LongTailTrainer(train_net.setup(_args(out, 4, resume=True)))
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 2
    predictor = trainer.model.roi_heads.box_predictor
    assert isinstance(predictor, EQLv2OutputLayers)
    assert torch.equal(predictor.eqlv2_pos_grad, pos) and torch.equal(predictor.eqlv2_neg_grad, neg)
    trainer.train()
    resumed_pos, resumed_neg = _saved_stats(out)
    assert torch.all(resumed_pos >= pos) and torch.all(resumed_neg > neg)
