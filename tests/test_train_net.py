"""End to end through train_net.py: train, evaluate, --eval-only, --resume, --num-gpus 2 on CPU,
and the guards on OUTPUT_DIR. Uses the quick config (a few iterations of batch 2)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from detectron2.engine import default_argument_parser

import train_net

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO, "configs", "quick_schedules", "ce_instant_test.yaml")


def _args(*argv):
    return default_argument_parser().parse_args(["--config-file", QUICK, *argv])


def _metrics_records(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _metrics_iterations(out_dir):
    return [record["iteration"] for record in _metrics_records(out_dir)]


def _final_eval(out_dir):
    """The evaluation at the end of training, as train_net.py's run logged it to metrics.json."""
    last = [r for r in _metrics_records(out_dir) if "bbox/AP" in r][-1]
    results = {}
    for key, value in last.items():
        task, _, metric = key.partition("/")
        if task in ("bbox", "segm"):
            results.setdefault(task, {})[metric] = value
    return results


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes_lt_root):
    """One 12-iteration run with a checkpoint at iteration 10 (index 9) and its results."""
    out = str(tmp_path_factory.mktemp("quick"))
    train_net.main(_args("OUTPUT_DIR", out, "SOLVER.MAX_ITER", "12", "SOLVER.CHECKPOINT_PERIOD", "10"))
    return out, _final_eval(out)


def test_train_then_evaluate(trained):
    out, results = trained
    assert set(results) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"):
            value = results[task][key]
            assert value is None or math.isnan(value) or 0.0 <= value <= 100.0, (task, key, value)
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    assert os.path.isfile(os.path.join(out, "model_0000009.pth"))
    per_class = os.path.join(out, "inference", "shapes_lt_val_mini", "lvis_per_class_bbox.json")
    with open(per_class) as f:
        assert len(json.load(f)) == 30
    with open(os.path.join(out, "class_stats.json")) as f:
        stats = json.load(f)
    assert len(stats["categories"]) == 30 and stats["num_images"] > 1000
    assert torch.load(os.path.join(out, "model_final.pth"))["iteration"] == 11


def test_eval_only_reproduces_the_numbers(trained, tmp_path):
    out, results = trained
    weights = os.path.join(out, "model_final.pth")
    again = train_net.main(_args("--eval-only", "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(tmp_path)))
    assert set(again) == set(results)
    for task in results:
        for key, value in results[task].items():
            other = again[task][key]
            assert (math.isnan(value) and math.isnan(other)) or other == pytest.approx(value, abs=1e-9)


def test_fresh_run_refuses_to_overwrite_checkpoints(trained):
    out, _ = trained
    before = os.path.getmtime(os.path.join(out, "model_final.pth"))
    with pytest.raises(FileExistsError, match="--resume"):
        train_net.main(_args("OUTPUT_DIR", out))
    assert os.path.getmtime(os.path.join(out, "model_final.pth")) == before


def test_unwritable_output_dir_is_reported(tmp_path, shapes_lt_root):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="OUTPUT_DIR"):
        train_net.main(_args("OUTPUT_DIR", str(blocker / "run")))


def test_resume_continues_at_the_saved_iteration(trained, tmp_path):
    src, _ = trained
    out = str(tmp_path / "resumed")
    os.makedirs(out)
    # A run stopped after its checkpoint at iteration index 9 (what a killed job leaves behind).
    torch.save(torch.load(os.path.join(src, "model_0000009.pth")), os.path.join(out, "model_0000009.pth"))
    with open(os.path.join(out, "last_checkpoint"), "w") as f:
        f.write("model_0000009.pth")

    cfg = train_net.setup(_args("--resume", "OUTPUT_DIR", out, "SOLVER.MAX_ITER", "14"))
    trainer = train_net.LongTailTrainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 10
    trainer.train()
    assert trainer.iter == 14  # detectron2 leaves iter at max_iter after the loop
    iterations = _metrics_iterations(out)
    assert min(iterations) >= 10  # nothing re-ran from iteration 0
    assert torch.load(os.path.join(out, "model_final.pth"))["iteration"] == 13


def test_two_processes_on_cpu(tmp_path, shapes_lt_root):
    """--num-gpus 2 without GPUs: two gloo ranks train with DDP and evaluate together."""
    out = str(tmp_path / "ddp")
    cmd = [
        sys.executable, os.path.join(REPO, "train_net.py"), "--num-gpus", "2",
        "--config-file", QUICK, "OUTPUT_DIR", out, "SOLVER.MAX_ITER", "4",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "World size: 2" in proc.stderr + proc.stdout
    assert torch.load(os.path.join(out, "model_final.pth"))["iteration"] == 3
    assert os.path.isfile(os.path.join(out, "inference", "shapes_lt_val_mini", "lvis_per_class_segm.json"))
