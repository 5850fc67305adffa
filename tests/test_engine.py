"""LongTailTrainer's additions that need no training run: full-model gradient clipping and the
OUTPUT_DIR guard, and how often training start loads the training set."""
import os

import pytest
import torch
from detectron2.config import get_cfg

from longtail import add_longtail_config
from longtail.engine import LongTailTrainer, check_output_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sgd_cfg(clip_type, max_norm=1.0):
    cfg = get_cfg()
    add_longtail_config(cfg)
    cfg.SOLVER.BASE_LR = 1.0
    cfg.SOLVER.MOMENTUM = 0.0
    cfg.SOLVER.WEIGHT_DECAY = 0.0
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = clip_type
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = max_norm
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
    return cfg


def _step_with_grads(cfg, grads):
    """One optimizer step from zero weights with the given gradients; returns the new weights."""
    model = torch.nn.Module()
    model.a = torch.nn.Parameter(torch.zeros(2))
    model.b = torch.nn.Parameter(torch.zeros(1))
    optimizer = LongTailTrainer.build_optimizer(cfg, model)
    model.a.grad = torch.tensor(grads[:2])
    model.b.grad = torch.tensor(grads[2:])
    optimizer.step()
    return torch.cat([model.a.detach(), model.b.detach()]), optimizer


def test_full_model_clipping_scales_all_gradients_together():
    # |g| = sqrt(9 + 16 + 144) = 13 over the whole model; max norm 1 scales every entry by 1/13.
    new, optimizer = _step_with_grads(_sgd_cfg("full_model"), [3.0, 4.0, 12.0])
    expected = -torch.tensor([3.0, 4.0, 12.0]) / 13.0
    assert torch.allclose(new, expected, atol=1e-6)
    assert torch.linalg.vector_norm(new).item() == pytest.approx(1.0, abs=1e-5)
    # The checkpoint sees a plain SGD state.
    assert isinstance(optimizer, torch.optim.SGD)
    plain = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    plain.load_state_dict(optimizer.state_dict())


def test_upstream_norm_clipping_is_per_parameter():
    # detectron2's "norm" clips a (|.|=5 -> 1) and b (|.|=12 -> 1) separately: a different update.
    new, _ = _step_with_grads(_sgd_cfg("norm"), [3.0, 4.0, 12.0])
    assert torch.allclose(new, -torch.tensor([0.6, 0.8, 1.0]), atol=1e-5)


def test_no_clipping_below_the_max_norm():
    new, _ = _step_with_grads(_sgd_cfg("full_model", max_norm=100.0), [3.0, 4.0, 12.0])
    assert torch.allclose(new, -torch.tensor([3.0, 4.0, 12.0]))


def test_output_dir_guard(tmp_path):
    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path / "run")
    check_output_dir(cfg, resume=False)  # a new folder: fine, and created
    assert os.path.isdir(cfg.OUTPUT_DIR) and os.listdir(cfg.OUTPUT_DIR) == []
    (tmp_path / "run" / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(FileExistsError, match="last_checkpoint"):
        check_output_dir(cfg, resume=False)
    check_output_dir(cfg, resume=True)  # continuing the run is what --resume is for


@pytest.mark.parametrize("preflight", ["cheap", "off"])
def test_training_start_loads_the_training_set_twice_not_three_times(tmp_path, shapes_lt_root,
                                                                     preflight):
    # The preflight's dicts feed the class statistics; detectron2's train loader loads its own.
    # (On LVIS v1 train each load takes tens of seconds and gigabytes.)
    from detectron2.data import DatasetCatalog, MetadataCatalog

    loads = []
    name = f"counted_shapes_lt_train_{preflight}"

    def load():
        loads.append(1)
        return DatasetCatalog.get("shapes_lt_train")

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(thing_classes=MetadataCatalog.get("shapes_lt_train").thing_classes)
    try:
        cfg = get_cfg()
        add_longtail_config(cfg)
        cfg.merge_from_file(os.path.join(REPO, "configs", "quick_schedules", "ce_instant_test.yaml"))
        cfg.merge_from_list(["OUTPUT_DIR", str(tmp_path), "DATASETS.TRAIN", f"('{name}',)",
                             "DATASETS.TEST", "()", "MODEL.LONGTAIL.DATA.PREFLIGHT", preflight])
        trainer = LongTailTrainer(cfg)
        assert len(loads) == 2  # preflight + class statistics share one; the loader's own
        assert trainer.model.roi_heads.box_predictor.num_classes == 30
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
