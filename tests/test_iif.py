"""IIFOutputLayers: the predictor against functional/iif.py, inference, empty batches, zero-count
classes, checkpointed weights, and a short train_net run."""
import json
import os

import pytest
import torch
from detectron2.engine import default_argument_parser
from detectron2.utils.events import EventStorage

import train_net
from predictor_helpers import FEATURES, predictor_args, proposals_with_labels
from longtail.functional.iif import IIF_VARIANTS, iif_loss, iif_weights
from longtail.modeling.predictors import IIFOutputLayers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO, "configs", "quick_schedules", "ce_instant_test.yaml")
COUNTS = [20, 7, 1, 0]  # the last class has no training image at all
NUM_IMAGES = 50


def _predictor(variant="raw", classifier="linear"):
    torch.manual_seed(0)
    return IIFOutputLayers(
        **predictor_args(len(COUNTS)),
        class_counts=COUNTS,
        num_images=NUM_IMAGES,
        variant=variant,
        classifier=classifier,
        cosine_scale=8.0,
    )


@pytest.mark.parametrize("variant", IIF_VARIANTS)
def test_loss_and_probs_use_the_weights_of_the_variant(variant):
    predictor = _predictor(variant, classifier="cosine")
    weights = iif_weights(torch.tensor(COUNTS, dtype=torch.float64), NUM_IMAGES, variant)
    assert torch.allclose(predictor.iif_weights, weights.float())
    assert torch.isfinite(predictor.iif_weights).all()  # zero-count class included

    labels = [[0, 4, 4, 3], [1, 2]]
    proposals = proposals_with_labels(labels)
    with EventStorage():
        predictions = predictor(torch.randn(6, FEATURES))
        losses = predictor.losses(predictions, proposals)
    gt = torch.tensor([c for image in labels for c in image])
    expected = iif_loss(predictions[0], gt, weights.float())
    assert losses["loss_cls"].item() == pytest.approx(expected.item(), rel=1e-6)
    losses["loss_cls"].backward()
    assert torch.isfinite(predictor.cls_score.weight.grad).all()

    probs = torch.cat(predictor.predict_probs(predictions, proposals)).detach()
    weighted = predictions[0].detach() * weights.float()
    assert torch.allclose(probs, weighted.softmax(dim=1), atol=1e-6)
    assert torch.all(probs >= 0) and torch.allclose(probs.sum(dim=1), torch.ones(6))


@pytest.mark.parametrize("labels", [[[]], [[4, 4, 4], [4]]], ids=["empty", "all_background"])
def test_empty_and_all_background_batches_backprop(labels):
    predictor = _predictor("base10")
    proposals = proposals_with_labels(labels)
    num = sum(len(p) for p in proposals)
    with EventStorage():
        losses = predictor.losses(predictor(torch.randn(num, FEATURES)), proposals)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()


def test_weights_are_restored_from_the_checkpoint():
    trained = _predictor("base10")
    other = IIFOutputLayers(
        **predictor_args(len(COUNTS)),
        class_counts=[1, 1, 1, 1],
        num_images=NUM_IMAGES,
        variant="base10",
    )
    assert not torch.equal(other.iif_weights, trained.iif_weights)
    other.load_state_dict(trained.state_dict())
    assert torch.equal(other.iif_weights, trained.iif_weights)


def test_train_net_with_iif(tmp_path, shapes_lt_root):
    out = str(tmp_path / "iif")
    args = default_argument_parser().parse_args(
        [
            "--config-file", QUICK,
            "MODEL.LONGTAIL.PREDICTOR", "IIFOutputLayers",
            "MODEL.LONGTAIL.IIF.VARIANT", "base10",
            "MODEL.LONGTAIL.IIF.COUNT_TYPE", "instance",
            "MODEL.LONGTAIL.CLASSIFIER", "cosine",
            "MODEL.LONGTAIL.COSINE_SCALE", "8.0",
            "SOLVER.MAX_ITER", "4",
            "OUTPUT_DIR", out,
        ]
    )
    train_net.main(args)
    model = torch.load(os.path.join(out, "model_final.pth"))["model"]
    saved = model["roi_heads.box_predictor.iif_weights"]
    with open(os.path.join(out, "class_stats.json")) as f:
        stats = json.load(f)
    counts = torch.tensor([c["instance_count"] for c in stats["categories"]], dtype=torch.float64)
    expected = iif_weights(counts, None, "base10").float()  # IOF: K = all instances
    assert torch.equal(saved, expected)
    assert os.path.isfile(os.path.join(out, "inference", "shapes_lt_val_mini", "lvis_per_class_segm.json"))
