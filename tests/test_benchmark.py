"""The accuracy benchmark's orchestration (plan, dependencies, failures, outputs, resume, refusal
to overwrite) with stand-in training processes, and one real two-iteration run through
train_net.py to pin the files it reads."""
import json
import os
import sys

import pytest

from longtail.tools import benchmark
from longtail.tools.benchmark import METHODS, Schedule, plan_runs

TINY = Schedule(max_iter=2, steps=(1,), warmup=0, test_set="shapes_lt_val_mini")


def _fake_command(run, runs, schedule):
    """A process that writes what train_net.py would: metrics.json with an evaluation line
    (bbox AP = 10 + seed for CE, 20 for others) and per-class records; "lda" fails."""
    code = f"""
import json, os, sys
out = {run.out_dir!r}
if {run.method.key!r} == "lda":
    sys.exit(3)
if {run.method.starts_from is not None!r}:
    assert os.path.exists({os.path.join(os.path.dirname(run.out_dir), "ce_seed0", "model_final.pth")!r})
ap = 10.0 + {run.seed} if {run.method.key!r} == "ce" else 20.0
metrics = {{"iteration": {schedule.max_iter - 1}}}
for t in ("bbox", "segm"):
    for k, v in (("AP", ap), ("APr", ap - 5), ("APc", ap), ("APf", ap + 5)):
        metrics[f"{{t}}/{{k}}"] = v
with open(os.path.join(out, "metrics.json"), "w") as f:
    f.write(json.dumps({{"iteration": 0, "total_loss": 1.0}}) + "\\n")
    f.write(json.dumps(metrics) + "\\n")
open(os.path.join(out, "model_final.pth"), "w").close()
inf = os.path.join(out, "inference", {schedule.test_set!r})
os.makedirs(inf)
for t in ("bbox", "segm"):
    with open(os.path.join(inf, f"lvis_per_class_{{t}}.json"), "w") as f:
        json.dump([{{"id": 1, "train_instance_count": 5, "AP": 0.1}},
                   {{"id": 2, "train_instance_count": 300, "AP": 0.5}}], f)
"""
    return [sys.executable, "-c", code]


@pytest.fixture
def fake_training(monkeypatch):
    monkeypatch.setattr(benchmark, "command_for", _fake_command)
    monkeypatch.setitem(benchmark.SCHEDULES, "full", TINY)


def test_plan_puts_every_ce_seed_first_and_pulls_in_ce():
    runs = plan_runs(["bags", "ecm"], ce_seeds=[0, 1], seed=0, out="/x")
    assert [r.name for r in runs] == ["ce_seed0", "ce_seed1", "bags", "ecm"]
    assert [r.seed for r in runs] == [0, 1, 0, 0]
    with pytest.raises(ValueError, match="Unknown method.*nope"):
        plan_runs(["nope"], [0], 0, "/x")
    with pytest.raises(ValueError, match="at least one seed"):
        plan_runs(["ecm"], [], 0, "/x")


def test_every_method_has_a_leaf_and_the_commands_use_it():
    runs = plan_runs([m.key for m in METHODS], [0], 0, "/out")
    for run in runs:
        assert os.path.exists(os.path.join(benchmark.CONFIG_DIR, run.method.config)), run.name
        cmd = benchmark.command_for(run, runs, TINY)
        assert cmd[cmd.index("OUTPUT_DIR") + 1] == run.out_dir
        assert cmd[cmd.index("SOLVER.MAX_ITER") + 1] == "2"
        if run.method.key == "bags":
            assert cmd[cmd.index("MODEL.WEIGHTS") + 1] == "/out/runs/ce_seed0/model_final.pth"
        else:
            assert "MODEL.WEIGHTS" not in cmd


def test_benchmark_runs_reports_failures_and_refuses_to_overwrite(tmp_path, fake_training, monkeypatch):
    out = str(tmp_path / "bench")
    args = ["--methods", "bags,ecm,lda", "--ce-seeds", "0,1", "--jobs", "2", "--out", out]
    monkeypatch.setattr(benchmark, "POLL_SECONDS", 0.05)
    assert benchmark.main(args) == 1  # lda fails on purpose
    data = json.load(open(os.path.join(out, "results.json")))
    status = {r["name"]: r["status"] for r in data["runs"]}
    assert status == {"ce_seed0": "done", "ce_seed1": "done", "bags": "done", "ecm": "done",
                      "lda": "failed"}
    # CE spread over seeds 0 and 1 (AP 10 and 11), deltas against their mean 10.5.
    assert data["ce_spread"]["bbox/AP"]["mean"] == pytest.approx(10.5)
    assert data["ce_spread"]["bbox/AP"]["half_range"] == pytest.approx(0.5)
    table = open(os.path.join(out, "results.md")).read()
    assert "| ECM | 20.0 | 15.0 | 20.0 | 25.0 |" in table
    assert "+9.5" in table and "±0.5" in table
    assert "lda" in table and "failed: exit code 3" in table
    for png in ("ap_by_frequency.png", "ap_vs_instances.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000
    # A second benchmark into the same folder is refused unless asked for.
    with pytest.raises(SystemExit, match="--resume.*--overwrite"):
        benchmark.main(args)
    # --resume keeps the finished runs (their folders untouched) and redoes only lda.
    stamp = os.path.getmtime(os.path.join(out, "runs", "ecm", "metrics.json"))
    assert benchmark.main(args + ["--resume"]) == 1
    assert os.path.getmtime(os.path.join(out, "runs", "ecm", "metrics.json")) == stamp
    asides = [d for d in os.listdir(os.path.join(out, "runs")) if d.startswith("lda.incomplete")]
    assert len(asides) == 1  # the failed run's folder was kept, moved aside


def test_a_method_whose_starting_model_failed_is_skipped(tmp_path, monkeypatch):
    def failing_ce(run, runs, schedule):
        if run.method.key == "ce":
            return [sys.executable, "-c", "import sys; sys.exit(1)"]
        return _fake_command(run, runs, schedule)

    monkeypatch.setattr(benchmark, "command_for", failing_ce)
    runs = plan_runs(["bags"], [0], 0, str(tmp_path))
    benchmark.execute(runs, TINY, jobs=1, poll_seconds=0.05)
    assert [r.status for r in runs] == ["failed", "skipped"]
    assert "needs ce" in runs[1].error


def test_one_real_run_through_train_net(tmp_path):
    """Two iterations of CE through train_net.py: the benchmark finds its evaluation and
    per-class records where it looks for them."""
    runs = plan_runs(["ce"], [0], 0, str(tmp_path))
    benchmark.execute(runs, TINY, jobs=1, poll_seconds=0.5)
    (run,) = runs
    assert run.status == "done", open(os.path.join(run.out_dir, "stdout.log")).read()[-3000:]
    assert set(run.metrics) >= {"bbox/AP", "bbox/APr", "segm/APf"}
    assert len(run.per_class["bbox"]) == 30
    assert {"train_instance_count", "AP"} <= set(run.per_class["bbox"][0])
