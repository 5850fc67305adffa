"""Small inputs shared by the predictor tests (imported by test modules; pytest puts tests/ on
sys.path)."""
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, Instances

FEATURES = 8


def predictor_args(num_classes):
    """The upstream FastRCNNOutputLayers arguments every test predictor needs."""
    return dict(
        input_shape=ShapeSpec(channels=FEATURES),
        box2box_transform=Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0)),
        num_classes=num_classes,
    )


def proposals_with_labels(labels_per_image):
    """One Instances per image whose sampled RoIs have the given gt_classes (K = background)."""
    proposals = []
    for labels in labels_per_image:
        n = len(labels)
        inst = Instances((64, 64))
        boxes = torch.tensor([[4.0, 4.0, 30.0, 30.0]]).repeat(n, 1) + torch.arange(n)[:, None]
        inst.proposal_boxes = Boxes(boxes)
        inst.gt_boxes = Boxes(boxes + 1.0)
        inst.gt_classes = torch.tensor(labels, dtype=torch.long)
        proposals.append(inst)
    return proposals


def random_features(num, seed=0):
    """(num, FEATURES) seeded box features."""
    return torch.randn(num, FEATURES, generator=torch.Generator().manual_seed(seed))


def flat_labels(labels_per_image):
    """The (R,) gt_classes of ``proposals_with_labels(labels_per_image)``, concatenated."""
    return torch.tensor([c for image in labels_per_image for c in image], dtype=torch.long)


def predictor_losses(predictor, labels_per_image, seed=0):
    """``predictor.losses`` on seeded features for RoIs with the given labels, in an EventStorage;
    returns (losses, predictions)."""
    from detectron2.utils.events import EventStorage

    proposals = proposals_with_labels(labels_per_image)
    features = random_features(sum(len(p) for p in proposals), seed)
    with EventStorage():
        predictions = predictor(features)
        return predictor.losses(predictions, proposals), predictions
