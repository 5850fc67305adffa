"""Smoke test of ``python -m longtail.tools.bench_eval`` on a tiny generated set.

Both evaluators run on a few images with generated categories (the LVIS category list is not
needed); the metric difference must stay within the benchmark's 1e-4 and the report files must be
written, and never overwritten without ``--overwrite``.
"""

import json
import math

import numpy as np
import pytest

from longtail.tools import bench_eval


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """Generated data (8 images x 40 results, bbox and segm) and its description."""
    data_dir = tmp_path_factory.mktemp("bench_eval_data")
    info = bench_eval.generate_dataset(
        data_dir,
        num_images=8,
        dets_per_image=40,
        tasks=("bbox", "segm"),
        seed=0,
        categories_path=None,
    )
    return data_dir, info


def test_generated_set_is_lvis_like(tiny_set):
    _, info = tiny_set
    with open(info["gt"]) as f:
        gt = json.load(f)
    frequencies = [c["frequency"] for c in gt["categories"]]
    assert len(frequencies) == 1203
    assert {f: frequencies.count(f) for f in "rcf"} == bench_eval.LVIS_V1_SPLIT
    assert len(gt["images"]) == 8 and gt["annotations"]
    assert all(
        "neg_category_ids" in img and "not_exhaustive_category_ids" in img for img in gt["images"]
    )
    assert all(ann["area"] > 0 and ann["segmentation"] for ann in gt["annotations"])
    with open(info["results"]["segm"]) as f:
        segm = json.load(f)
    with open(info["results"]["bbox"]) as f:
        bbox = json.load(f)
    # Same detections in both files; segm results carry an RLE and no box (as detectron2 hands
    # them to lvis-api).
    assert len(segm) == len(bbox) == info["num_results"] >= 8 * 40
    assert [(r["image_id"], r["category_id"], r["score"]) for r in segm] == [
        (r["image_id"], r["category_id"], r["score"]) for r in bbox
    ]
    assert "bbox" not in segm[0] and isinstance(segm[0]["segmentation"]["counts"], str)
    # Same seed, same data.
    again = bench_eval.generate_ground_truth(
        bench_eval.load_categories(None, np.random.default_rng([0, 0]))[0],
        8,
        np.random.default_rng([0, 1]),
    )
    assert again["annotations"] == gt["annotations"]


def test_evaluators_agree(tiny_set):
    _, info = tiny_set
    records = [
        bench_eval.run_worker(evaluator, task, info["gt"], info["results"][task])
        for task in ("bbox", "segm")
        for evaluator in ("ours", "lvis-api")
    ]
    rows = bench_eval.summarize(records)
    assert [(r["task"], r["evaluator"]) for r in rows] == [
        ("bbox", "ours"),
        ("bbox", "lvis-api"),
        ("segm", "ours"),
        ("segm", "lvis-api"),
    ]
    for row in rows:
        assert row["max_abs_diff"] <= bench_eval.MAX_ABS_DIFF, row
        assert row["metrics"]["AP"] > 0.05
        assert row["total_s"] > 0 and row["speedup"] > 0
    checks, _ = bench_eval.check_targets(rows, val_size=False)
    assert any("max abs metric difference" in c and ": met" in c for c in checks)
    report = bench_eval.markdown_report(info, rows, checks, "python -m longtail.tools.bench_eval")
    assert "| bbox | ours |" in report and "| segm | lvis-api |" in report
    # The lvis-api worker patches np.float only while it runs.
    assert not hasattr(np, "float") or np.float is float


def test_cli_writes_report_and_never_overwrites(tiny_set, tmp_path, capsys):
    data_dir, _ = tiny_set
    out = tmp_path / "report"
    argv = [
        "--images",
        "8",
        "--dets-per-image",
        "40",
        "--tasks",
        "bbox",
        "--seed",
        "0",
        "--categories",
        str(tmp_path / "absent.json"),
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
    ]
    assert bench_eval.main(argv) == 0
    markdown = (tmp_path / "report.md").read_text()
    assert "| task | evaluator |" in markdown and "| bbox | lvis-api |" in markdown
    assert markdown in capsys.readouterr().out
    summary = json.loads((tmp_path / "report.json").read_text())
    assert {r["evaluator"] for r in summary["rows"]} == {"ours", "lvis-api"}
    ours = next(r for r in summary["rows"] if r["evaluator"] == "ours")
    assert ours["max_abs_diff"] <= bench_eval.MAX_ABS_DIFF
    assert not math.isnan(ours["rss_delta_gb"]) and ours["peak_rss_gb"] > 0

    with pytest.raises(SystemExit):
        bench_eval.main(argv)
    assert (tmp_path / "report.md").read_text() == markdown
