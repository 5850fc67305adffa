"""Accuracy benchmark: every method trained on shapes-lt with the same model, seed and schedule,
evaluated the same way, side by side.

    python -m longtail.tools.benchmark                 # the full benchmark (README's table)
    python -m longtail.tools.benchmark --quick         # a pipeline check in minutes
    python -m longtail.tools.benchmark --methods ce,ecm,iif --out output/bench-mine

Each method is its shapes-lt leaf in ``configs/ShapesLT/`` run through ``train_net.py`` in its own
process (so one method cannot leak state into the next), ``--jobs`` at a time with the cores
split between them. The CE baseline runs with several seeds: their spread says which deltas are
signal. BAGS' stage 2 starts from the CE (first seed) model, as its recipe does.

Writes into ``--out`` (never over an earlier benchmark unless ``--overwrite``; ``--resume`` keeps
the runs that finished and redoes the rest):

* ``results.json``: every run's metrics, per-class AP, time and status;
* ``results.md``: the table (bbox and segm AP, APr, APc, APf, and the delta to CE);
* ``ap_by_frequency.png``: APr/APc/APf bars per method;
* ``ap_vs_instances.png``: per-class AP against training instances, each method over CE;
* ``runs/<name>/``: each run's OUTPUT_DIR (log, metrics, model, evaluation files).
"""
import argparse
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from .machine import cpu_model

logger = logging.getLogger("longtail.benchmark")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs", "ShapesLT")

#: Metric keys of the table, in order (the evaluator reports them x100).
TABLE_KEYS = ("AP", "APr", "APc", "APf")
TASKS = ("bbox", "segm")


@dataclass(frozen=True)
class Method:
    """One row of the benchmark: a shapes-lt leaf, and the method whose model it starts from."""

    key: str
    label: str
    config: str
    starts_from: Optional[str] = None  # key of the run whose model_final.pth is MODEL.WEIGHTS


#: Every registered method, in table order. CE first: it is the reference of every delta.
METHODS: Sequence[Method] = (
    Method("ce", "CE (softmax)", "ce_mask_rcnn_R_18_FPN_demo.yaml"),
    Method("ce_rfs", "CE + RFS", "ce_rfs_mask_rcnn_R_18_FPN.yaml"),
    Method("fed", "sigmoid + fed loss, RFS", "fed_mask_rcnn_R_18_FPN.yaml"),
    Method("eqlv2", "EQL v2", "eqlv2_mask_rcnn_R_18_FPN.yaml"),
    Method("seesaw", "Seesaw", "seesaw_mask_rcnn_R_18_FPN.yaml"),
    Method("bags", "BAGS (stage 2 on CE)", "bags_stage2_mask_rcnn_R_18_FPN.yaml", starts_from="ce"),
    Method("ecm", "ECM", "ecm_mask_rcnn_R_18_FPN.yaml"),
    Method("iif", "IIF (base10, cosine, RFS)", "iif_base10_iof_cos_mask_rcnn_R_18_FPN.yaml"),
    Method("lda", "LDA (no RFS)", "lda_mask_rcnn_R_18_FPN.yaml"),
    Method("pcb_ce", "PCB on CE", "pcb_ce_mask_rcnn_R_18_FPN.yaml"),
    Method("pcb_ce_rfs", "PCB on CE + RFS", "pcb_ce_rfs_mask_rcnn_R_18_FPN.yaml"),
    Method("pcb_eqlv2", "PCB on EQL v2", "pcb_eqlv2_mask_rcnn_R_18_FPN.yaml"),
    Method("pcb_seesaw", "PCB on Seesaw", "pcb_seesaw_mask_rcnn_R_18_FPN.yaml"),
)
METHODS_BY_KEY = {m.key: m for m in METHODS}


@dataclass(frozen=True)
class Schedule:
    """Overrides applied to every run. ``pcb_start`` keeps PCB's start at 3/4 of the schedule, as
    in the leaves (270 of 360), whatever the length."""

    max_iter: int
    steps: tuple
    warmup: int
    test_set: str
    ims_per_batch: int = 4
    base_lr: float = 0.01
    # shapes-lt images hold 1-3 objects: 50 detections per image keep every true positive a
    # method ranks reasonably, and halve the mask head's and the mask pasting's work, over half
    # of the evaluation's time at 100 (the evaluation is ~40 % of a run).
    detections_per_image: int = 50
    extra: tuple = ()

    def opts(self) -> List[str]:
        return [
            "SOLVER.IMS_PER_BATCH", str(self.ims_per_batch),
            "SOLVER.BASE_LR", str(self.base_lr),
            "SOLVER.MAX_ITER", str(self.max_iter),
            "SOLVER.STEPS", str(tuple(self.steps)),
            "SOLVER.WARMUP_ITERS", str(self.warmup),
            "MODEL.LONGTAIL.PCB.START_ITER", str(self.max_iter * 3 // 4),
            "DATASETS.TEST", f"('{self.test_set}',)",
            "TEST.DETECTIONS_PER_IMAGE", str(self.detections_per_image),
            *self.extra,
        ]


SCHEDULES: Dict[str, Schedule] = {
    # The leaves' 360 iterations at half their batch (8 -> 4) and, by the linear scaling rule,
    # half their LR (0.02 -> 0.01): 14 runs must fit in an hour on 2 CPU cores. Evaluated on the
    # full val split (456 images, 30 instances per class).
    "full": Schedule(max_iter=360, steps=(270, 330), warmup=100, test_set="shapes_lt_val"),
    # A pipeline check: every method trains and evaluates, but on a schedule far too short for
    # the numbers to mean anything (the output says so). The LR warms up over the whole run: with
    # a 10-iteration warm-up, PCB on EQL v2 diverged at iteration 20 from the random init.
    "quick": Schedule(
        max_iter=40, steps=(30, 36), warmup=40, test_set="shapes_lt_val_mini",
        extra=("MODEL.LONGTAIL.LDA.WINDOW", "5", "MODEL.LONGTAIL.ECM.MEASURE_ITERS", "5"),
    ),
}


@dataclass
class Run:
    """One training + evaluation process."""

    name: str  # unique: method key, plus the seed for repeated seeds
    method: Method
    seed: int
    out_dir: str
    status: str = "pending"  # pending | running | done | failed | skipped
    seconds: float = 0.0
    iteration: int = 0
    metrics: Dict[str, float] = field(default_factory=dict)
    per_class: Dict[str, list] = field(default_factory=dict)
    error: str = ""
    process: Optional[subprocess.Popen] = None
    started: float = 0.0


# ---------------------------------------------------------------------------------- planning


def plan_runs(method_keys: Sequence[str], ce_seeds: Sequence[int], seed: int, out: str) -> List[Run]:
    """The runs of the benchmark in start order: CE (every seed) first, then the other methods.

    A method that starts from another run's model pulls that run in (BAGS needs CE)."""
    unknown = [k for k in method_keys if k not in METHODS_BY_KEY]
    if unknown:
        raise ValueError(
            f"Unknown method(s) {unknown}; choose from {[m.key for m in METHODS]} (--methods)."
        )
    if not ce_seeds:
        raise ValueError("--ce-seeds needs at least one seed: every delta is relative to CE.")
    keys = ["ce"] + [k for k in method_keys if k != "ce"]
    runs = []
    for key in keys:
        method = METHODS_BY_KEY[key]
        seeds = list(ce_seeds) if key == "ce" else [seed]
        for s in seeds:
            name = f"{key}_seed{s}" if key == "ce" else key
            runs.append(Run(name, method, s, os.path.join(out, "runs", name)))
    return runs


def _reference_run(runs: Sequence[Run], key: str) -> Run:
    """The run a dependent method starts from: the first run of method ``key``."""
    return next(r for r in runs if r.method.key == key)


def command_for(run: Run, runs: Sequence[Run], schedule: Schedule) -> List[str]:
    cmd = [
        sys.executable, os.path.join(REPO_ROOT, "train_net.py"),
        "--config-file", os.path.join(CONFIG_DIR, run.method.config),
        "OUTPUT_DIR", run.out_dir,
        "SEED", str(run.seed),
        *schedule.opts(),
    ]
    if run.method.starts_from:
        parent = _reference_run(runs, run.method.starts_from)
        cmd += ["MODEL.WEIGHTS", os.path.join(parent.out_dir, "model_final.pth")]
    return cmd


# ---------------------------------------------------------------------------------- results


def read_final_metrics(out_dir: str) -> Dict[str, float]:
    """The evaluation of the last line of ``metrics.json`` that has one ({} if none)."""
    path = os.path.join(out_dir, "metrics.json")
    if not os.path.exists(path):
        return {}
    final = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            entry = json.loads(line)
            if "bbox/AP" in entry:
                final = {k: v for k, v in entry.items() if "/" in k and k.split("/")[0] in TASKS}
    return final


def read_last_iteration(out_dir: str) -> int:
    """The latest iteration detectron2's JSON writer recorded (written every 20 iterations)."""
    path = os.path.join(out_dir, "metrics.json")
    if not os.path.exists(path):
        return 0
    last = 0
    with open(path) as f:
        for line in f:
            match = re.search(r'"iteration": (\d+)', line)
            if match:
                last = int(match.group(1))
    return last


def read_per_class(out_dir: str, test_set: str) -> Dict[str, list]:
    """Per-class AP records that the evaluator wrote, by task."""
    per_class = {}
    for task in TASKS:
        path = os.path.join(out_dir, "inference", test_set, f"lvis_per_class_{task}.json")
        if os.path.exists(path):
            with open(path) as f:
                per_class[task] = json.load(f)
    return per_class


def _finite(values: Sequence[float]) -> List[float]:
    return [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def ce_spread(runs: Sequence[Run]) -> Dict[str, Dict[str, float]]:
    """Mean, min, max and half range of every metric over the finished CE seeds."""
    ce = [r for r in runs if r.method.key == "ce" and r.status == "done"]
    spread = {}
    for key in sorted({k for r in ce for k in r.metrics}):
        values = _finite([r.metrics.get(key) for r in ce])
        if values:
            spread[key] = {
                "mean": sum(values) / len(values),
                "min": min(values),
                "max": max(values),
                "half_range": (max(values) - min(values)) / 2,
                "n": len(values),
            }
    return spread


def _fmt(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.1f}"


def _fmt_delta(value: Optional[float], half_range: float) -> str:
    if value is None or math.isnan(value):
        return "–"
    text = f"{value:+.1f}"
    # A delta inside the CE seeds' spread is not signal: mark it.
    return f"({text})" if abs(value) <= half_range else text


def results_markdown(runs: Sequence[Run], spread, schedule_name: str, meta: dict) -> str:
    header = (
        "| method | bbox AP | APr | APc | APf | segm AP | APr | APc | APf "
        "| Δ bbox AP | Δ bbox APr | Δ segm APr | minutes |"
    )
    lines = [header, "|" + "---|" * 13]
    rows: Dict[str, List[Run]] = {}
    for r in runs:
        rows.setdefault(r.method.key, []).append(r)
    for key, group in rows.items():
        done = [r for r in group if r.status == "done"]
        label = group[0].method.label
        if key == "ce" and len(group) > 1:
            label += f" (mean of {len(done)} seeds)"
        if not done:
            state = group[0].status + (f": {group[0].error}" if group[0].error else "")
            lines.append(f"| {label} | {state} |" + " |" * 11)
            continue
        if key == "ce":
            metrics = {k: v["mean"] for k, v in spread.items()}
        else:
            metrics = done[0].metrics
        cells = [_fmt(metrics.get(f"{t}/{k}")) for t in TASKS for k in TABLE_KEYS]
        deltas = []
        for metric in ("bbox/AP", "bbox/APr", "segm/APr"):
            base = spread.get(metric, {})
            if key == "ce":
                deltas.append(f"±{base.get('half_range', float('nan')):.1f}" if base else "–")
            elif metric in metrics and base:
                deltas.append(_fmt_delta(metrics[metric] - base["mean"], base["half_range"]))
            else:
                deltas.append("–")
        minutes = sum(r.seconds for r in done) / len(done) / 60
        lines.append(f"| {label} | " + " | ".join(cells + deltas) + f" | {minutes:.1f} |")
    ce_runs = [r for r in runs if r.method.key == "ce" and r.status == "done"]
    seeds = "; ".join(
        f"seed {r.seed}: bbox AP/APr/APc/APf "
        + "/".join(_fmt(r.metrics.get(f"bbox/{k}")) for k in TABLE_KEYS)
        for r in ce_runs
    )
    notes = [
        "",
        f"Schedule `{schedule_name}`: {meta['schedule']}. Machine: {meta['machine']}. "
        f"Total wall time {meta['wall_minutes']:.0f} min with {meta['jobs']} runs at a time.",
        f"CE seeds ({seeds}); the Δ columns are against their mean, in parentheses where they are "
        "within the seeds' half range (±, the CE row), i.e. not distinguishable from seed noise.",
    ]
    unfinished = [r.name for r in runs if r.status in ("pending", "running")]
    if unfinished:
        notes.append(f"**Partial: still to run: {', '.join(unfinished)}.**")
    if schedule_name == "quick":
        notes.append(
            "**Quick mode: a pipeline check. The schedule is far too short for these numbers to "
            "say anything about the methods.**"
        )
    return "\n".join(lines + notes) + "\n"


# ---------------------------------------------------------------------------------- plots


def plot_frequency_bars(runs: Sequence[Run], spread, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for key in dict.fromkeys(r.method.key for r in runs):
        done = [r for r in runs if r.method.key == key and r.status == "done"]
        if not done:
            continue
        if key == "ce":
            metrics = {k: v["mean"] for k, v in spread.items()}
        else:
            metrics = done[0].metrics
        rows.append((done[0].method.label, metrics))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(rows)) * 2, 4.5), sharey=True)
    width = 0.27
    for ax, task in zip(axes, TASKS):
        for j, (group, colour) in enumerate(zip(("APr", "APc", "APf"), ("#d62728", "#ff7f0e", "#1f77b4"))):
            xs = [i + (j - 1) * width for i in range(len(rows))]
            ys = [m.get(f"{task}/{group}", float("nan")) for _, m in rows]
            ax.bar(xs, ys, width, label=group, color=colour)
        if f"{task}/APr" in spread:
            ax.axhline(spread[f"{task}/APr"]["mean"], color="#d62728", lw=0.8, ls="--")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([label for label, _ in rows], rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{task} AP by frequency group (dashed: CE's APr)")
        ax.set_ylabel("AP")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ap_vs_instances(runs: Sequence[Run], path: str, task: str = "bbox") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def points(run):
        records = run.per_class.get(task, [])
        xs = [max(r["train_instance_count"], 1) for r in records if r.get("AP") is not None]
        ys = [100 * r["AP"] for r in records if r.get("AP") is not None]
        return xs, ys

    ce = next((r for r in runs if r.method.key == "ce" and r.status == "done"), None)
    others = [r for r in runs if r.method.key != "ce" and r.status == "done" and r.per_class]
    if ce is None or not others:
        return
    cols = 4
    nrows = math.ceil(len(others) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False,
                             sharex=True, sharey=True)
    ce_x, ce_y = points(ce)
    for ax, run in zip(axes.flat, others):
        x, y = points(run)
        ax.scatter(ce_x, ce_y, s=14, color="grey", alpha=0.6, label=f"CE (seed {ce.seed})")
        ax.scatter(x, y, s=14, color="#d62728", label=run.method.label)
        ax.set_xscale("log")
        ax.set_title(run.method.label, fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    for ax in axes.flat[len(others):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("training instances (log)")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"{task} AP per class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------- running


def _machine() -> str:
    return f"{os.cpu_count()} cores, {cpu_model()}, torch CPU"


def _start(run: Run, runs: Sequence[Run], schedule: Schedule, threads: int) -> None:
    if os.path.exists(run.out_dir):
        # A run that did not finish: keep its files, out of the way, instead of deleting them.
        aside = f"{run.out_dir}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}"
        logger.warning("%s: moving the unfinished run's folder aside to %s", run.name, aside)
        os.rename(run.out_dir, aside)
    os.makedirs(run.out_dir)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = command_for(run, runs, schedule)
    with open(os.path.join(run.out_dir, "command.txt"), "w") as f:
        f.write(" ".join(cmd) + "\n")
    log = open(os.path.join(run.out_dir, "stdout.log"), "w")
    run.process = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    run.status, run.started = "running", time.time()
    logger.info("%s: started (%s, seed %d)", run.name, run.method.config, run.seed)


def _finish(run: Run, schedule: Schedule) -> None:
    code = run.process.wait()
    run.seconds = time.time() - run.started
    run.process = None
    run.metrics = read_final_metrics(run.out_dir)
    if code != 0 or not run.metrics:
        run.status = "failed"
        run.error = f"exit code {code}; see {os.path.join(run.out_dir, 'stdout.log')}"
        logger.error("%s: FAILED (%s)", run.name, run.error)
        return
    run.status = "done"
    run.iteration = schedule.max_iter
    run.per_class = read_per_class(run.out_dir, schedule.test_set)
    logger.info(
        "%s: done in %.1f min: bbox AP %.1f APr %.1f APf %.1f", run.name, run.seconds / 60,
        run.metrics.get("bbox/AP", float("nan")), run.metrics.get("bbox/APr", float("nan")),
        run.metrics.get("bbox/APf", float("nan")),
    )


def _ready(run: Run, runs: Sequence[Run]) -> Optional[bool]:
    """True to start, False to wait, None when the run it starts from failed."""
    if not run.method.starts_from:
        return True
    parent = _reference_run(runs, run.method.starts_from)
    if parent.status == "done":
        return True
    if parent.status in ("failed", "skipped"):
        return None
    return False


def _progress(runs: Sequence[Run], schedule: Schedule, began: float, jobs: int) -> str:
    now = time.time()
    running = []
    for r in runs:
        if r.status == "running":
            r.iteration = read_last_iteration(r.out_dir)
            # The JSON writer's last line comes one period before the end: training is done.
            state = "evaluating" if r.iteration >= schedule.max_iter - 20 else f"{r.iteration}/{schedule.max_iter}"
            running.append(f"{r.name} {state}")
    finished = [r for r in runs if r.status in ("done", "failed", "skipped")]
    timed = [r.seconds for r in runs if r.status == "done" and r.seconds > 0]
    pending = sum(r.status == "pending" for r in runs)
    if timed:
        # Remaining work in run-lengths of the runs finished so far, shared by the jobs.
        per_run = sum(timed) / len(timed)
        left = pending * per_run + sum(
            max(per_run - (now - r.started), 0.0) for r in runs if r.status == "running"
        )
        eta_text = f"{left / max(jobs, 1) / 60:.0f} min"
    else:
        eta_text = "? (after the first run)"
    return (f"{len(finished)}/{len(runs)} runs finished; running: {', '.join(running) or '-'}; "
            f"elapsed {(now - began) / 60:.1f} min, ETA {eta_text}")


#: How often the runs are checked on (seconds).
POLL_SECONDS = 15.0


def execute(runs: List[Run], schedule: Schedule, jobs: int, poll_seconds: Optional[float] = None,
            on_finish: Optional[Callable[[float], None]] = None) -> float:
    """Run every pending run, ``jobs`` at a time; returns the wall time in seconds.

    ``on_finish(elapsed_seconds)`` is called after each run ends, so that the results so far
    are on disk while the rest still trains."""
    poll_seconds = POLL_SECONDS if poll_seconds is None else poll_seconds
    threads = max(1, (os.cpu_count() or 1) // jobs)
    began = time.time()
    last_report = 0.0
    while True:
        for run in runs:
            if run.status == "running" and run.process.poll() is not None:
                _finish(run, schedule)
                if on_finish is not None:
                    on_finish(time.time() - began)
        active = sum(r.status == "running" for r in runs)
        for run in runs:
            if active >= jobs:
                break
            if run.status != "pending":
                continue
            ready = _ready(run, runs)
            if ready is None:
                run.status, run.error = "skipped", f"needs {run.method.starts_from}, which failed"
                logger.error("%s: skipped (%s)", run.name, run.error)
            elif ready:
                _start(run, runs, schedule, threads)
                active += 1
        if not any(r.status in ("pending", "running") for r in runs):
            return time.time() - began
        if time.time() - last_report >= 60:
            logger.info("%s", _progress(runs, schedule, began, jobs))
            last_report = time.time()
        time.sleep(poll_seconds)


def _load_finished(runs: Sequence[Run], schedule: Schedule) -> None:
    """--resume: keep every run whose folder holds a final evaluation."""
    for run in runs:
        metrics = read_final_metrics(run.out_dir)
        if metrics:
            run.status, run.metrics = "done", metrics
            run.per_class = read_per_class(run.out_dir, schedule.test_set)
            run.seconds = _recorded_seconds(run.out_dir)
            logger.info("%s: finished earlier, kept (--resume)", run.name)


def _recorded_seconds(out_dir: str) -> float:
    """The run's wall time as recorded by the benchmark, else from its files' times: the command
    is written first, metrics.json last (after the evaluation)."""
    try:
        with open(os.path.join(out_dir, "benchmark_seconds.txt")) as f:
            return float(f.read().strip())
    except (OSError, ValueError):
        pass
    try:
        return (os.path.getmtime(os.path.join(out_dir, "metrics.json"))
                - os.path.getmtime(os.path.join(out_dir, "command.txt")))
    except OSError:
        return 0.0


def write_outputs(runs: Sequence[Run], out: str, schedule_name: str, schedule: Schedule,
                  wall: float, jobs: int, argv: Sequence[str]) -> Dict[str, str]:
    for run in runs:
        if run.status == "done" and run.seconds:
            with open(os.path.join(run.out_dir, "benchmark_seconds.txt"), "w") as f:
                f.write(f"{run.seconds:.1f}\n")
    spread = ce_spread(runs)
    meta = {
        "schedule": f"{schedule.max_iter} iterations at batch {schedule.ims_per_batch}, LR "
                    f"{schedule.base_lr:g} with steps at {tuple(schedule.steps)}, evaluated on "
                    f"{schedule.test_set} with {schedule.detections_per_image} detections per "
                    "image",
        "machine": _machine(),
        "wall_minutes": wall / 60,
        "jobs": jobs,
        "command": "python -m longtail.tools.benchmark " + " ".join(argv),
    }
    data = {
        **meta,
        "schedule_name": schedule_name,
        "ce_spread": spread,
        "runs": [
            {
                "name": r.name, "method": r.method.key, "label": r.method.label,
                "config": f"configs/ShapesLT/{r.method.config}", "seed": r.seed,
                "status": r.status, "error": r.error, "seconds": round(r.seconds, 1),
                "metrics": r.metrics, "per_class": r.per_class,
            }
            for r in runs
        ],
    }
    paths = {
        "json": os.path.join(out, "results.json"),
        "md": os.path.join(out, "results.md"),
        "bars": os.path.join(out, "ap_by_frequency.png"),
        "scatter": os.path.join(out, "ap_vs_instances.png"),
    }
    with open(paths["json"], "w") as f:
        json.dump(data, f, indent=1, allow_nan=True)
    with open(paths["md"], "w") as f:
        f.write(f"Command: `{meta['command']}`\n\n")
        f.write(results_markdown(runs, spread, schedule_name, meta))
    if any(r.status == "done" for r in runs):
        plot_frequency_bars(runs, spread, paths["bars"])
        plot_ap_vs_instances(runs, paths["scatter"])
    return paths


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Train and evaluate every long-tail method on shapes-lt, side by side.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="a short pipeline check (minutes); the numbers are not meaningful")
    parser.add_argument("--methods", default=",".join(m.key for m in METHODS),
                        help="comma-separated method keys (default: all): "
                             + ", ".join(m.key for m in METHODS))
    parser.add_argument("--ce-seeds", default="0,1",
                        help="seeds of the CE baseline runs; their spread is reported (default 0,1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every other method (default 0)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="runs at a time; the CPU cores are split between them (default 2)")
    parser.add_argument("--out", default=None,
                        help="output folder (default output/benchmark/<full|quick>)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="keep the finished runs of an earlier benchmark in --out, redo the rest")
    group.add_argument("--overwrite", action="store_true",
                       help="delete an earlier benchmark in --out and start over")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s benchmark] %(message)s",
                        datefmt="%H:%M:%S")
    schedule_name = "quick" if args.quick else "full"
    schedule = SCHEDULES[schedule_name]
    out = os.path.abspath(args.out or os.path.join(REPO_ROOT, "output", "benchmark", schedule_name))
    if args.jobs < 1:
        raise SystemExit("--jobs must be at least 1")
    try:
        ce_seeds = [int(s) for s in args.ce_seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--ce-seeds must be comma-separated integers, got {args.ce_seeds!r}")
    methods = [k.strip() for k in args.methods.split(",") if k.strip()]
    try:
        runs = plan_runs(methods, ce_seeds, args.seed, out)
    except ValueError as e:
        raise SystemExit(str(e))
    if os.path.exists(out) and os.listdir(out):
        if args.overwrite:
            logger.warning("--overwrite: deleting the earlier benchmark in %s", out)
            shutil.rmtree(out)
        elif not args.resume:
            raise SystemExit(
                f"{out} already holds a benchmark. Pass --resume to keep its finished runs, "
                "--overwrite to delete it, or --out to write elsewhere."
            )
    os.makedirs(out, exist_ok=True)
    if args.resume:
        _load_finished(runs, schedule)
    logger.info("%d runs (%s schedule) into %s, %d at a time", len(runs), schedule_name, out, args.jobs)
    def write_so_far(elapsed):
        write_outputs(runs, out, schedule_name, schedule, elapsed, args.jobs, argv)

    wall = execute(runs, schedule, args.jobs, on_finish=write_so_far)
    paths = write_outputs(runs, out, schedule_name, schedule, wall, args.jobs, argv)
    with open(paths["md"]) as f:
        sys.stdout.write(f.read())
    logger.info("wrote %s", ", ".join(paths.values()))
    return 0 if all(r.status == "done" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
