"""Untrusted checkpoints (longtail/engine/checkpoint.py): files that need arbitrary unpickling are
refused unless --trust-checkpoint (and no code of theirs runs), model-zoo .pkl numpy weights still
load, this project's own checkpoints resume on the safe path, and --eval-only refuses a checkpoint
that does not fill the model."""

import os
import pickle

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg

import train_net
from longtail import add_longtail_config
from longtail.engine import LongTailTrainer
from longtail.engine.checkpoint import (
    IncompleteCheckpointError,
    LongTailCheckpointer,
    UntrustedCheckpointError,
)
from longtail.engine.decoupled import StageTwoCheckpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO, "configs", "quick_schedules", "ce_instant_test.yaml")


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
        self.head = torch.nn.Linear(2, 3)


def _touch(path):
    """What a malicious file could run while it is unpickled (here: create a file)."""
    with open(path, "w"):
        pass
    return "payload ran"


class _Payload:
    """A pickled custom object whose unpickling calls :func:`_touch`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _touch, (self.marker,)


def _trained_tiny():
    torch.manual_seed(1)
    model = _Tiny()
    model.body[1].running_mean.fill_(0.5)
    return model


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------ .pth


def test_pth_needing_arbitrary_unpickling_is_refused_with_the_flag_named(tmp_path):
    source, marker = _trained_tiny(), tmp_path / "payload-ran"
    path = str(tmp_path / "evil.pth")
    torch.save({"model": source.state_dict(), "extra": _Payload(str(marker))}, path)

    model = _Tiny()
    with pytest.raises(UntrustedCheckpointError) as info:
        LongTailCheckpointer(model).load(path)
    message = str(info.value)
    assert path in message and "--trust-checkpoint" in message
    assert "_Payload" in message or "_touch" in message  # says what it would have built
    assert not marker.exists()  # nothing of the file ran

    # The stage-2 checkpointer reads MODEL.WEIGHTS the same way.
    with pytest.raises(UntrustedCheckpointError, match="--trust-checkpoint"):
        StageTwoCheckpointer(_Tiny(), reinit=["head"]).resume_or_load(path, resume=False)
    assert not marker.exists()

    trusted = _Tiny()
    extra = LongTailCheckpointer(trusted, trust_checkpoint=True).load(path)
    assert extra["extra"] == "payload ran" and marker.exists()
    _assert_same_state(trusted, source)


def test_plain_state_dict_pth_loads_on_the_safe_path(tmp_path, monkeypatch):
    source = _trained_tiny()
    path = str(tmp_path / "plain.pth")
    torch.save(source.state_dict(), path)  # a bare state dict, as third-party weights often are
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    model = _Tiny()
    LongTailCheckpointer(model, strict=True).load(path)
    _assert_same_state(model, source)
    assert [c.get("weights_only") for c in calls] == [True]


# ------------------------------------------------------------------ .pkl and .pyth


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_model_zoo_pkl_of_numpy_arrays_loads_without_the_flag(tmp_path, protocol):
    source = _trained_tiny()
    path = str(tmp_path / "zoo.pkl")
    arrays = {k: v.numpy() for k, v in source.state_dict().items()}
    with open(path, "wb") as f:
        pickle.dump(
            {"model": arrays, "__author__": "someone", "note": np.float32(1.0)},
            f,
            protocol=protocol,
        )
    model = _Tiny()
    LongTailCheckpointer(model).load(path)
    _assert_same_state(model, source)


def test_caffe2_pkl_gives_detectron2s_structure(tmp_path):
    path = str(tmp_path / "c2.pkl")
    blobs = {
        "conv1_w": np.ones((2, 1, 1, 1), np.float32),
        "conv1_w_momentum": np.zeros((2, 1, 1, 1), np.float32),
    }
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)
    loaded = LongTailCheckpointer(_Tiny())._load_file(path)
    assert loaded["__author__"] == "Caffe2" and loaded["matching_heuristics"] is True
    assert list(loaded["model"]) == ["conv1_w"]  # the optimizer's momentum is dropped


def test_pkl_with_a_custom_class_is_refused_then_trusted(tmp_path):
    marker = tmp_path / "payload-ran"
    path = str(tmp_path / "evil.pkl")
    with open(path, "wb") as f:
        pickle.dump({"model": {}, "__author__": "x", "extra": _Payload(str(marker))}, f)
    with pytest.raises(UntrustedCheckpointError, match=r"evil\.pkl.*_touch.*--trust-checkpoint"):
        LongTailCheckpointer(_Tiny())._load_file(path)
    assert not marker.exists()
    loaded = LongTailCheckpointer(_Tiny(), trust_checkpoint=True)._load_file(path)
    assert loaded["extra"] == "payload ran" and marker.exists()


def test_pycls_pyth_is_refused_without_the_flag(tmp_path):
    path = str(tmp_path / "regnet.pyth")
    torch.save({"model_state": _Tiny().state_dict()}, path)
    with pytest.raises(UntrustedCheckpointError, match=r"regnet\.pyth.*--trust-checkpoint"):
        LongTailCheckpointer(_Tiny())._load_file(path)
    assert "model" in LongTailCheckpointer(_Tiny(), trust_checkpoint=True)._load_file(path)


def test_train_net_parses_the_flag():
    args = train_net.argument_parser().parse_args(["--config-file", QUICK, "--trust-checkpoint"])
    assert args.trust_checkpoint is True
    assert (
        train_net.argument_parser().parse_args(["--config-file", QUICK]).trust_checkpoint is False
    )


# ------------------------------------------------------------------ this project's checkpoints


def _cfg(out, *opts):
    cfg = get_cfg()
    add_longtail_config(cfg)
    cfg.merge_from_file(QUICK)
    cfg.merge_from_list(["OUTPUT_DIR", out, "DATASETS.TEST", "()", *opts])
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory, shapes_lt_root):
    """A 2-iteration training run with a checkpoint after each iteration."""
    out = str(tmp_path_factory.mktemp("run"))
    trainer = LongTailTrainer(_cfg(out, "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1"))
    trainer.resume_or_load(resume=False)
    trainer.train()
    return out


def test_own_training_checkpoint_resumes_on_the_safe_path(run, tmp_path, monkeypatch):
    out = str(tmp_path / "resumed")
    os.makedirs(out)
    saved = torch.load(os.path.join(run, "model_0000000.pth"), weights_only=True)
    torch.save(saved, os.path.join(out, "model_0000000.pth"))
    with open(os.path.join(out, "last_checkpoint"), "w") as f:
        f.write("model_0000000.pth")

    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    trainer = LongTailTrainer(_cfg(out, "SOLVER.MAX_ITER", "3"))
    assert (
        isinstance(trainer.checkpointer, LongTailCheckpointer)
        and not trainer.checkpointer.trust_checkpoint
    )
    trainer.resume_or_load(resume=True)
    assert [c.get("weights_only") for c in calls] == [True]
    # Everything came back: model, iteration, optimizer (momentum), scheduler.
    assert trainer.start_iter == 1
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved["model"].items())
    assert (
        trainer.optimizer.state_dict()["state"].keys()
        == saved["trainer"]["_trainer"]["optimizer"]["state"].keys()
    )
    assert trainer.scheduler.last_epoch == saved["trainer"]["hooks"]["LRScheduler"]["last_epoch"]


def _eval_only(weights, out, *flags, opts=()):
    args = train_net.argument_parser().parse_args(
        [
            "--config-file",
            QUICK,
            *flags,
            "--eval-only",
            "OUTPUT_DIR",
            out,
            "MODEL.WEIGHTS",
            weights,
            *opts,
        ]
    )
    return train_net.main(args)


# Evaluating the 2-iteration model on shapes_lt_val_mini takes about a minute on 2 CPU cores:
# the tests below that get past loading evaluate no dataset (DATASETS.TEST empty). The full
# --eval-only run of a good checkpoint, on this same safe and strict path, is
# test_train_net.py::test_eval_only_reproduces_the_numbers.
NO_EVAL = ("DATASETS.TEST", "()")


def _edited_checkpoint(run, tmp_path, edit):
    checkpoint = torch.load(os.path.join(run, "model_final.pth"), weights_only=True)
    edit(checkpoint["model"])
    path = str(tmp_path / "edited.pth")
    torch.save(checkpoint, path)
    return path


def test_eval_only_refuses_a_checkpoint_missing_a_key(run, tmp_path):
    path = _edited_checkpoint(
        run, tmp_path, lambda m: m.pop("roi_heads.box_predictor.cls_score.weight")
    )
    with pytest.raises(
        IncompleteCheckpointError,
        match=r"edited\.pth does not match.*1 model keys missing from it "
        r"\(roi_heads\.box_predictor\.cls_score\.weight\).*config",
    ):
        _eval_only(path, str(tmp_path / "eval"))


def test_eval_only_refuses_unexpected_keys_and_other_shapes(run, tmp_path):
    def edit(model):
        model["roi_heads.box_predictor.extra.weight"] = torch.zeros(2)
        model["roi_heads.box_predictor.bbox_pred.bias"] = torch.zeros(7)

    path = _edited_checkpoint(run, tmp_path, edit)
    with pytest.raises(IncompleteCheckpointError) as info:
        _eval_only(path, str(tmp_path / "eval"))
    message = str(info.value)
    assert (
        "1 keys in it that the model does not have (roi_heads.box_predictor.extra.weight)"
        in message
    )
    assert "roi_heads.box_predictor.bbox_pred.bias (7,) vs (120,)" in message


def test_eval_only_refuses_to_evaluate_without_weights(tmp_path, shapes_lt_root):
    with pytest.raises(IncompleteCheckpointError, match="No checkpoint was loaded.*MODEL.WEIGHTS"):
        _eval_only("", str(tmp_path / "eval"))


def test_eval_only_refuses_untrusted_weights_unless_flagged(run, tmp_path):
    checkpoint = torch.load(os.path.join(run, "model_final.pth"), weights_only=True)
    checkpoint["extra"] = _Payload(str(tmp_path / "payload-ran"))
    path = str(tmp_path / "evil.pth")
    torch.save(checkpoint, path)
    with pytest.raises(UntrustedCheckpointError, match=r"evil\.pth.*--trust-checkpoint"):
        _eval_only(path, str(tmp_path / "eval"), opts=NO_EVAL)
    assert not (tmp_path / "payload-ran").exists()
    # With the flag it loads (and is complete).
    assert _eval_only(path, str(tmp_path / "eval"), "--trust-checkpoint", opts=NO_EVAL) == {}
    assert (tmp_path / "payload-ran").exists()


def test_eval_only_loads_the_right_checkpoint_on_the_safe_path(run, tmp_path, monkeypatch):
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    assert (
        _eval_only(os.path.join(run, "model_final.pth"), str(tmp_path / "eval"), opts=NO_EVAL) == {}
    )
    assert [c.get("weights_only") for c in calls] == [True]
