"""ECMOutputLayers and its background-ratio measurement: the predictor against functional/ecm.py,
inference, empty batches, the measurement across checkpoints and ranks, and a short train_net run."""
import json
import os

import pytest
import torch
from detectron2.engine import default_argument_parser
from detectron2.utils.events import EventStorage

import train_net
from predictor_helpers import FEATURES, predictor_args, proposals_with_labels
from longtail.functional.ecm import ecm_loss, ecm_margins
from longtail.modeling.predictors import ECMOutputLayers
from distributed_helpers import launch_two_ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO, "configs", "quick_schedules", "ce_instant_test.yaml")
COUNTS = [10, 90, 5]


def _predictor(measure_iters=0, bg_ratio=6.3313, classifier="linear"):
    torch.manual_seed(0)
    return ECMOutputLayers(
        **predictor_args(len(COUNTS)),
        class_counts=COUNTS,
        bg_ratio=bg_ratio,
        measure_iters=measure_iters,
        classifier=classifier,
    )


def _losses(predictor, labels_per_image):
    proposals = proposals_with_labels(labels_per_image)
    num = sum(len(p) for p in proposals)
    features = torch.randn(num, FEATURES, generator=torch.Generator().manual_seed(num))
    with EventStorage():
        predictions = predictor(features)
        return predictor.losses(predictions, proposals), predictions


def test_loss_is_the_functional_ecm_loss_with_the_configured_margins():
    predictor = _predictor()
    labels = [[0, 3, 3, 1], [2, 3]]
    losses, (scores, _) = _losses(predictor, labels)
    margins = ecm_margins(torch.tensor(COUNTS, dtype=torch.float64), 6.3313)
    gt = torch.tensor([c for image in labels for c in image])
    expected = ecm_loss(scores, gt, margins.delta, margins.weight)
    assert losses["loss_cls"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    losses["loss_cls"].backward()
    assert predictor.cls_score.weight.grad.abs().sum() > 0


def test_inference_probabilities_background_last():
    predictor = _predictor(classifier="cosine")
    predictor.eval()
    proposals = proposals_with_labels([[3, 3, 0], [1]])
    with torch.no_grad():
        predictions = predictor(torch.randn(4, FEATURES))
        probs = torch.cat(predictor.predict_probs(predictions, proposals))
    scores = predictions[0]
    assert probs.shape == (4, 4)
    assert torch.allclose(probs[:, -1], scores[:, -1].sigmoid())
    assert torch.all(probs >= 0) and torch.all(probs[:, :-1] <= 1 - probs[:, -1:] + 1e-7)
    # detectron2's inference drops the last column and keeps scores above the threshold.
    instances, _ = predictor.inference(predictions, proposals)
    assert all(torch.all(i.scores <= 1) for i in instances)


@pytest.mark.parametrize("labels", [[[]], [[3, 3, 3], [3]]], ids=["empty", "all_background"])
def test_empty_and_all_background_batches_backprop(labels):
    predictor = _predictor(measure_iters=5)
    losses, _ = _losses(predictor, labels)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(predictor.cls_score.weight.grad).all()


def test_measurement_freezes_the_ratio_and_the_margins():
    predictor = _predictor(measure_iters=2, bg_ratio=6.3313)
    _losses(predictor, [[0, 3, 3], [1, 3]])  # 2 fg, 3 bg
    assert not bool(predictor.ecm_ratio_frozen)
    default = ecm_margins(torch.tensor(COUNTS, dtype=torch.float64), 6.3313)
    assert torch.allclose(predictor.ecm_delta, default.delta.float())
    _losses(predictor, [[3, 3, 3, 2]])  # 1 fg, 3 bg
    assert bool(predictor.ecm_ratio_frozen)
    assert float(predictor.ecm_bg_ratio) == pytest.approx(6 / 3)
    measured = ecm_margins(torch.tensor(COUNTS, dtype=torch.float64), 2.0)
    assert torch.allclose(predictor.ecm_delta, measured.delta.float())
    assert torch.allclose(predictor.ecm_weight, measured.weight.float())
    _losses(predictor, [[0, 0, 0, 0]])  # frozen: no more counting
    assert predictor.ecm_fg_bg_counts.tolist() == [3.0, 6.0]


def test_evaluation_does_not_measure():
    predictor = _predictor(measure_iters=2)
    predictor.eval()
    _losses(predictor, [[0, 3]])
    assert int(predictor.ecm_measured_iters) == 0


def test_checkpoint_before_the_end_of_the_measurement_continues_it():
    uninterrupted = _predictor(measure_iters=2)
    _losses(uninterrupted, [[0, 3, 3]])
    _losses(uninterrupted, [[1, 1, 3, 3, 3, 3, 3]])

    first = _predictor(measure_iters=2)
    _losses(first, [[0, 3, 3]])
    resumed = _predictor(measure_iters=2)
    resumed.load_state_dict(first.state_dict())
    assert int(resumed.ecm_measured_iters) == 1
    _losses(resumed, [[1, 1, 3, 3, 3, 3, 3]])
    assert bool(resumed.ecm_ratio_frozen)
    assert float(resumed.ecm_bg_ratio) == float(uninterrupted.ecm_bg_ratio) == pytest.approx(7 / 3)


def test_checkpoint_after_the_measurement_is_not_measured_again():
    first = _predictor(measure_iters=1)
    _losses(first, [[0, 3, 3, 3]])
    resumed = _predictor(measure_iters=1)  # a fresh predictor would measure ...
    resumed.load_state_dict(first.state_dict())  # ... but the checkpoint says r is final
    assert bool(resumed.ecm_ratio_frozen) and float(resumed.ecm_bg_ratio) == pytest.approx(3.0)
    assert torch.equal(resumed.ecm_delta, first.ecm_delta)
    _losses(resumed, [[0, 0]])
    assert resumed.ecm_fg_bg_counts.tolist() == [1.0, 3.0]


def _two_rank_worker(out_path):
    from detectron2.utils import comm

    rank = comm.get_rank()
    predictor = _predictor(measure_iters=2)
    # rank 0 sees 1 fg + 1 bg per step, rank 1 sees 3 bg and an empty image: r = 8 / 2 = 4.
    labels = [[0, 3]] if rank == 0 else [[3, 3, 3], []]
    for _ in range(2):
        _losses(predictor, labels)
    state = {k: v.tolist() for k, v in predictor.state_dict().items() if k.startswith("ecm_")}
    gathered = comm.gather(state, dst=0)
    if comm.is_main_process():
        with open(out_path, "w") as f:
            json.dump(gathered, f)


def test_two_ranks_measure_the_same_ratio(tmp_path):
    out = tmp_path / "ranks.json"
    launch_two_ranks(_two_rank_worker, str(out))
    ranks = json.loads(out.read_text())
    assert ranks[0] == ranks[1]
    assert ranks[0]["ecm_bg_ratio"] == pytest.approx(4.0)
    assert ranks[0]["ecm_fg_bg_counts"] == [2.0, 8.0]


def _ecm_args(*opts, resume=False):
    return default_argument_parser().parse_args(
        (["--resume"] if resume else [])
        + [
            "--config-file", QUICK,
            "MODEL.LONGTAIL.PREDICTOR", "ECMOutputLayers",
            "MODEL.LONGTAIL.CLASSIFIER", "cosine",
            "MODEL.ROI_MASK_HEAD.NAME", "CosineMaskRCNNConvUpsampleHead",
            "MODEL.LONGTAIL.ECM.MEASURE_BG_RATIO", "True",
            "SOLVER.CLIP_GRADIENTS.ENABLED", "True",
            "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model",
            "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "5.0",
            *opts,
        ]
    )


def _ecm_state(path):
    model = torch.load(path)["model"]
    prefix = "roi_heads.box_predictor."
    return {k[len(prefix):]: v for k, v in model.items() if k.startswith(prefix + "ecm_")}


def test_train_net_measures_saves_and_resumes_the_ratio(tmp_path, shapes_lt_root):
    out = str(tmp_path / "ecm")
    # Stop after 2 of 4 measuring iterations, as a killed job would.
    train_net.main(_ecm_args("OUTPUT_DIR", out, "MODEL.LONGTAIL.ECM.MEASURE_ITERS", "4",
                             "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()"))
    state = _ecm_state(os.path.join(out, "model_final.pth"))
    assert int(state["ecm_measured_iters"]) == 2 and not bool(state["ecm_ratio_frozen"])
    counted = state["ecm_fg_bg_counts"].clone()
    assert not os.path.exists(os.path.join(out, "ecm_bg_ratio.json"))

    # Resume: the count continues from the checkpoint and freezes after iteration 4.
    train_net.main(_ecm_args("OUTPUT_DIR", out, "MODEL.LONGTAIL.ECM.MEASURE_ITERS", "4",
                             "SOLVER.MAX_ITER", "6", resume=True))
    state = _ecm_state(os.path.join(out, "model_final.pth"))
    assert int(state["ecm_measured_iters"]) == 4 and bool(state["ecm_ratio_frozen"])
    assert torch.all(state["ecm_fg_bg_counts"] > counted)
    fg, bg = state["ecm_fg_bg_counts"].tolist()
    with open(os.path.join(out, "ecm_bg_ratio.json")) as f:
        report = json.load(f)
    assert report["bg_ratio"] == pytest.approx(bg / fg) == pytest.approx(float(state["ecm_bg_ratio"]))
    assert report["iterations"] == 4
    # 64-RoI sampling at 25 % positives: r is well above 1, unlike the configured default's cause.
    assert 1.0 < report["bg_ratio"] < 64.0

    # Resume after the measurement: nothing is counted again.
    train_net.main(_ecm_args("OUTPUT_DIR", out, "MODEL.LONGTAIL.ECM.MEASURE_ITERS", "4",
                             "SOLVER.MAX_ITER", "8", "DATASETS.TEST", "()", resume=True))
    again = _ecm_state(os.path.join(out, "model_final.pth"))
    assert torch.equal(again["ecm_fg_bg_counts"], state["ecm_fg_bg_counts"])
    assert torch.equal(again["ecm_delta"], state["ecm_delta"])


def test_stock_sigmoid_and_fed_keys_are_refused():
    with pytest.raises(ValueError, match="USE_SIGMOID_CE and USE_FED_LOSS"):
        ECMOutputLayers(
            **predictor_args(len(COUNTS)),
            class_counts=COUNTS,
            use_sigmoid_ce=True,
        )
