"""Smoke test of longtail/tools/bench_heads.py on a tiny synthetic stats json: every predictor
and PCB row is built from its LVIS recipe and timed, the ratios are finite, the files are written
and not overwritten, a missing stats json is a clear error, and the full-model training step runs
(on tiny images)."""

import json
import math

import pytest
import torch

from longtail.data import ClassStats
from longtail.tools import bench_heads

# Six classes over the four BAGS instance-count groups, r/c/f by image count.
CATEGORIES = [
    {"id": k + 1, "name": f"class{k}", "image_count": images, "instance_count": instances}
    for k, (images, instances) in enumerate(
        [(3, 4), (8, 30), (40, 90), (90, 400), (150, 900), (600, 5000)]
    )
]


@pytest.fixture
def stats_json(tmp_path):
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"num_images": 1000, "categories": CATEGORIES}))
    return str(path)


@pytest.fixture(autouse=True)
def _keep_threads():
    # The tool fixes torch's thread count; the rest of the session keeps its own.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _argv(stats_json, out):
    return [
        "--stats",
        stats_json,
        "--repeats",
        "2",
        "--warmup",
        "0",
        "--branch-repeats",
        "1",
        "--no-step",
        "--rois-per-image",
        "16",
        "--image-size",
        "64",
        "96",
        "--out",
        out,
    ]


def test_every_row_is_timed_and_written(stats_json, tmp_path, capsys):
    out = str(tmp_path / "bench")
    assert bench_heads.main(_argv(stats_json, out)) == 0
    table = capsys.readouterr().out
    results = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.md").read_text() == table

    names = [m.name for m in bench_heads.METHODS]
    for section in ("train", "loss_only", "predict_probs"):
        assert list(results[section]) == names
        for row in results[section].values():
            assert len(row["samples_ms"]) == 2
            assert math.isfinite(row["ratio"]) and row["ratio"] > 0
            assert all(math.isfinite(r) for r in row["ratio_iqr"])
    assert results["train"][bench_heads.BASELINE]["ratio"] == 1.0
    assert set(results["pcb_branch"]) == {bench_heads.CE_BRANCH.name, bench_heads.PCB_BRANCH.name}
    for row in [*results["pcb_branch"].values(), results["pcb_update"]]:
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0
    assert results["num_classes"] == len(CATEGORIES) and results["num_rois"] == 32
    assert results["machine"]["torch_threads"] == 1
    for name in [
        *names,
        bench_heads.CE_BRANCH.name,
        bench_heads.PCB_BRANCH.name,
        bench_heads.PCB_UPDATE,
    ]:
        assert f"| {name} |" in table
    assert "--stats" in results["command"]


def test_existing_output_is_kept_unless_overwrite(stats_json, tmp_path, capsys):
    (tmp_path / "bench.md").write_text("keep me")
    argv = _argv(stats_json, str(tmp_path / "bench"))
    assert bench_heads.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "bench.md").read_text() == "keep me"


def test_missing_stats_names_the_flag(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench_heads, "DEFAULT_STATS", str(tmp_path / "absent.json"))
    assert bench_heads.main(["--no-step"]) == 2
    err = capsys.readouterr().err
    assert "--stats" in err and "lvis_v1_train.json" in err


def test_training_step_is_timed(stats_json):
    settings = bench_heads.BenchSettings(
        image_size=(64, 96), step_iters=2, step_warmup=0, instances_per_image=2
    )
    stats = ClassStats.from_json(stats_json)
    step = bench_heads.time_training_step(stats_json, stats, settings)
    assert len(step["samples_s"]) == 2 and 0 < step["median_s"] < 60
