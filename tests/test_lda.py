"""LDAOutputLayers against functional/lda.py: the loss terms, which head each term trains, the
test scores, the alpha window (training only, all-reduced, checkpointed), degenerate batches and a
train_net run that resumes."""
import json
import os

import pytest
import torch
from detectron2.engine import default_argument_parser
from detectron2.utils.events import EventStorage

import train_net
from predictor_helpers import FEATURES, predictor_args, proposals_with_labels
from longtail.functional.lda import (
    adaptive_alpha,
    balanced_risk,
    fgbg_loss,
    inter_class_separation,
    intra_class_compactness,
    lda_probs,
    unbalanced_risk,
)
from longtail.modeling.predictors import LDAOutputLayers
from distributed_helpers import launch_two_ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO, "configs", "quick_schedules", "ce_instant_test.yaml")
COUNTS = [100, 10, 1, 0]  # the last class has no training instance
C = len(COUNTS)
BG = C
PROJ = 6


def _predictor(**kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("window", 4)
    return LDAOutputLayers(**predictor_args(C), class_counts=COUNTS, projection_dim=PROJ, **kwargs)


def _losses(predictor, labels, features=None, seed=1):
    proposals = proposals_with_labels(labels)
    num = sum(len(p) for p in proposals)
    if features is None:
        features = torch.randn(num, FEATURES, generator=torch.Generator().manual_seed(seed))
    with EventStorage() as storage:
        predictions = predictor(features)
        losses = predictor.losses(predictions, proposals)
    return losses, predictions, storage


def test_layout_and_loss_terms_are_the_functional_ones():
    predictor = _predictor(gamma=1.5, beta=0.1, balanced_weight=2.0)
    assert predictor.fgbg_score.out_features == 2
    assert predictor.cls_score.out_features == 2 * C
    assert predictor.projection.out_features == PROJ
    labels = [[0, 0, 1, BG, BG], [2, 3, BG]]
    features = torch.randn(8, FEATURES, generator=torch.Generator().manual_seed(1))
    losses, (scores, _), storage = _losses(predictor, labels, features)
    # In training the heads of the positives are applied in the loss: the forward gives [g | z].
    assert scores.shape == (8, 2 + FEATURES)
    assert torch.equal(scores[:, 2:], features)
    gt = torch.tensor([y for image in labels for y in image])
    pos = gt < C
    with torch.no_grad():
        g, (hu, hb), f = (predictor.fgbg_score(features), predictor.cls_score(features).split(C, 1),
                          predictor.projection(features))
    # The window already holds this iteration's accuracies: alpha is computed after the write.
    alpha = adaptive_alpha(predictor.lda_acc_unbalanced, predictor.lda_acc_balanced, 1.5).item()
    expected = {
        "loss_cls": fgbg_loss(g, pos),
        "loss_lda_unbalanced": unbalanced_risk(hu[pos], gt[pos]),
        "loss_lda_balanced": 2.0 * alpha * balanced_risk(hb[pos], gt[pos], COUNTS, "code"),
        "loss_lda_divergence": 0.1 * (intra_class_compactness(f[pos], gt[pos])
                                      + inter_class_separation(f[pos], gt[pos], 1.0)),
    }
    for key, value in expected.items():
        assert losses[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-8), key
    logged = storage.latest()
    assert logged["lda/alpha"][0] == pytest.approx(alpha)
    acc_u = 100.0 * (hu[pos].argmax(1) == gt[pos]).float().mean().item()
    assert logged["lda/acc_unbalanced"][0] == pytest.approx(acc_u)
    assert predictor.lda_acc_unbalanced.tolist() == pytest.approx([acc_u, 0, 0, 0])
    assert int(predictor.lda_step) == 1


def test_unbalanced_risk_can_average_over_all_sampled_rois():
    labels = [[0, 0, 1, BG, BG], [2, 3, BG]]  # 5 positives among 8 sampled RoIs
    paper = _predictor()
    detection = _predictor(unbalanced_norm="sampled")
    (p_losses, _, _), (d_losses, (scores, _), _) = _losses(paper, labels), _losses(detection, labels)
    gt = torch.tensor([y for image in labels for y in image])
    hu = detection.cls_score(scores[:, 2:])[:, :C]
    expected = torch.nn.functional.cross_entropy(hu[gt < C], gt[gt < C], reduction="sum") / 8
    assert d_losses["loss_lda_unbalanced"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert d_losses["loss_lda_unbalanced"].item() == pytest.approx(
        p_losses["loss_lda_unbalanced"].item() * 5 / 8, rel=1e-6
    )
    for key in ("loss_cls", "loss_lda_balanced", "loss_lda_divergence"):
        assert d_losses[key].item() == pytest.approx(p_losses[key].item(), rel=1e-6), key


def test_unknown_unbalanced_norm_is_refused_by_name():
    with pytest.raises(ValueError, match="UNBALANCED_NORM.*'positives', 'sampled'"):
        _predictor(unbalanced_norm="all")


def _row_grads(predictor, loss):
    predictor.zero_grad()
    loss.backward(retain_graph=True)
    w = predictor.cls_score.weight.grad
    if w is None:
        w = torch.zeros(2 * C)
    rows = {"g": predictor.fgbg_score.weight.grad, "h_unbalanced": w[:C], "h_balanced": w[C:]}
    touched = {name for name, grad in rows.items() if grad is not None and grad.abs().sum() > 0}
    if predictor.projection.weight.grad is not None and predictor.projection.weight.grad.abs().sum() > 0:
        touched.add("p")
    return touched


def test_each_term_trains_only_its_head():
    predictor = _predictor(fixed_alpha=3.0)
    losses, _, _ = _losses(predictor, [[0, 0, 1, 2, BG, BG]])
    assert _row_grads(predictor, losses["loss_cls"]) == {"g"}
    assert _row_grads(predictor, losses["loss_lda_unbalanced"]) == {"h_unbalanced"}
    assert _row_grads(predictor, losses["loss_lda_balanced"]) == {"h_balanced"}
    assert _row_grads(predictor, losses["loss_lda_divergence"]) == {"p"}


def test_background_rois_only_train_the_fgbg_head():
    predictor = _predictor(fixed_alpha=3.0)
    losses, _, _ = _losses(predictor, [[BG, BG, BG]])
    total = sum(v for k, v in losses.items() if k != "loss_box_reg")
    assert _row_grads(predictor, total) == {"g"}


def test_test_scores_are_fg_probability_times_the_balanced_head():
    predictor = _predictor().eval()
    proposals = proposals_with_labels([[0, 1, BG], [2]])
    predictions = predictor(torch.randn(4, FEATURES))
    scores = predictions[0]
    assert scores.shape == (4, 2 + 2 * C)  # no projection at inference
    probs = torch.cat(predictor.predict_probs(predictions, proposals)).detach()
    p_fg = scores[:, :2].softmax(1)[:, 0].detach()
    assert torch.allclose(probs[:, :C].sum(1), p_fg, atol=1e-6)
    assert torch.allclose(probs.sum(1), torch.ones(4), atol=1e-6)
    # Within a box the classes rank as h does.
    assert torch.equal(probs[:, :C].argmax(1), scores[:, 2 + C:].argmax(1))
    assert torch.allclose(probs, lda_probs(scores[:, :2], scores[:, 2 + C:]).detach())


def test_window_moves_only_in_training_and_with_positives():
    predictor = _predictor()
    _losses(predictor, [[BG, BG]])  # no positive anywhere: nothing to measure
    assert int(predictor.lda_step) == 0
    predictor.eval()
    with EventStorage(), pytest.raises(RuntimeError, match="training-mode forward"):
        predictor.losses(predictor(torch.randn(2, FEATURES)), proposals_with_labels([[0, 1]]))
    assert int(predictor.lda_step) == 0
    predictor.train()
    for _ in range(6):  # wraps around the 4 slots
        _losses(predictor, [[0, 1, 1]])
    assert int(predictor.lda_step) == 6


def test_fixed_alpha_replaces_the_adaptive_one():
    predictor = _predictor(fixed_alpha=7.0)
    losses, (scores, _), _ = _losses(predictor, [[0, 1, 2]])
    gt = torch.tensor([0, 1, 2])
    expected = 2.0 * 7.0 * balanced_risk(predictor.cls_score(scores[:, 2:])[:, C:], gt, COUNTS)
    assert losses["loss_lda_balanced"].item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("labels", [[[]], [[BG, BG, BG], [BG]], [[3, 3]], [[1]]],
                         ids=["empty", "all_background", "zero_count_class", "single_positive"])
def test_degenerate_batches_are_finite_and_backprop(labels):
    predictor = _predictor(fixed_alpha=5.0)
    losses, _, _ = _losses(predictor, labels)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    for p in (predictor.fgbg_score.weight, predictor.cls_score.weight, predictor.projection.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_state_dict_restores_the_window_and_the_next_loss():
    trained = _predictor()
    for seed in range(3):
        _losses(trained, [[0, 1, 2, BG]], seed=seed)
    resumed = _predictor()
    resumed.load_state_dict(trained.state_dict())
    for name in ("lda_acc_unbalanced", "lda_acc_balanced", "lda_step", "lda_class_counts"):
        assert torch.equal(getattr(resumed, name), getattr(trained, name)), name
    a, _, _ = _losses(trained, [[0, 2, 2, BG]], seed=9)
    b, _, _ = _losses(resumed, [[0, 2, 2, BG]], seed=9)
    assert {k: v.item() for k, v in a.items()} == {k: v.item() for k, v in b.items()}


def _two_rank_worker(out_path):
    from detectron2.utils import comm

    rank = comm.get_rank()
    predictor = _predictor()
    # Rank 0 sees positives, rank 1 only background and an empty image: both write rank 0's
    # accuracies (the only positives), and neither hangs.
    labels = [[0, 1, 1, 2]] if rank == 0 else [[BG, BG], []]
    for seed in range(3):
        _losses(predictor, labels, seed=seed)
    state = {k: v.tolist() for k, v in predictor.state_dict().items() if k.startswith("lda_")}
    state["alpha"] = predictor.alpha().item()
    gathered = comm.gather(state, dst=0)
    if comm.is_main_process():
        with open(out_path, "w") as f:
            json.dump(gathered, f)


def test_two_ranks_hold_the_same_window_and_alpha(tmp_path):
    out = tmp_path / "ranks.json"
    launch_two_ranks(_two_rank_worker, str(out))
    rank0, rank1 = json.loads(out.read_text())
    assert rank0 == rank1
    assert rank0["lda_step"] == 3

    alone = _predictor()
    for seed in range(3):
        _losses(alone, [[0, 1, 1, 2]], seed=seed)
    assert rank0["lda_acc_unbalanced"] == pytest.approx(alone.lda_acc_unbalanced.tolist())


def test_bad_config_values_are_refused():
    with pytest.raises(ValueError, match="BALANCED_NORM"):
        _predictor(balanced_norm="sum")
    with pytest.raises(ValueError, match="INTER_WEIGHTING"):
        _predictor(inter_weighting="both")
    with pytest.raises(ValueError, match="WINDOW"):
        _predictor(window=0)


def _lda_args(*opts, resume=False):
    return default_argument_parser().parse_args(
        (["--resume"] if resume else [])
        + ["--config-file", QUICK, "MODEL.LONGTAIL.PREDICTOR", "LDAOutputLayers",
           "MODEL.LONGTAIL.LDA.WINDOW", "8", *opts]
    )


def _lda_state(path):
    model = torch.load(path)["model"]
    prefix = "roi_heads.box_predictor."
    return {k[len(prefix):]: v for k, v in model.items() if k.startswith(prefix + "lda_")}


def test_train_net_trains_resumes_and_evaluates(tmp_path, shapes_lt_root):
    out = str(tmp_path / "lda")
    train_net.main(_lda_args("OUTPUT_DIR", out, "SOLVER.MAX_ITER", "3", "DATASETS.TEST", "()"))
    first = _lda_state(os.path.join(out, "model_final.pth"))
    assert int(first["lda_step"]) == 3
    assert torch.all(first["lda_acc_unbalanced"][:3] >= 0) and torch.all(first["lda_acc_unbalanced"][3:] == 0)

    train_net.main(_lda_args("OUTPUT_DIR", out, "SOLVER.MAX_ITER", "5", resume=True))
    again = _lda_state(os.path.join(out, "model_final.pth"))
    assert int(again["lda_step"]) == 5
    # The resumed run continued the window: the first three slots are the saved ones.
    assert torch.equal(again["lda_acc_unbalanced"][:3], first["lda_acc_unbalanced"][:3])
    with open(os.path.join(out, "metrics.json")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    assert any("segm/AP" in r for r in records)
    assert all(k in records[-2] or k in records[-1] for k in ("lda/alpha", "loss_lda_balanced"))
