"""Class statistics in a 2-process (gloo, CPU) run: computed once on the main rank, identical on
every rank."""
import json
import os

from distributed_helpers import launch_two_ranks

QUICK = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "configs", "quick_schedules", "ce_instant_test.yaml",
)


def _worker(out_path):
    # Runs in each spawned rank; imports happen here so the child sets itself up.
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog
    from detectron2.utils import comm

    import longtail.data.class_stats as class_stats
    from longtail import add_longtail_config

    cfg = get_cfg()
    add_longtail_config(cfg)
    cfg.merge_from_file(QUICK)
    # Only the main rank may read the dataset: fail loudly if another rank tries.
    if not comm.is_main_process():
        DatasetCatalog.remove("shapes_lt_train")
    stats = class_stats.load_class_stats(cfg)
    gathered = comm.gather(stats, dst=0)
    if comm.is_main_process():
        with open(out_path, "w") as f:
            json.dump([s.__dict__ for s in gathered], f)


def test_class_stats_identical_on_every_rank(tmp_path, shapes_lt_root):
    out = tmp_path / "stats.json"
    launch_two_ranks(_worker, str(out))
    ranks = json.loads(out.read_text())
    assert len(ranks) == 2 and ranks[0] == ranks[1]

    from longtail.data import ClassStats
    from detectron2.data import DatasetCatalog, MetadataCatalog

    expected = ClassStats.from_dataset_dicts(
        DatasetCatalog.get("shapes_lt_train"), MetadataCatalog.get("shapes_lt_train").thing_classes
    )
    assert ranks[0]["instance_count"] == list(expected.instance_count)
    assert ranks[0]["image_count"] == list(expected.image_count)
    assert ranks[0]["num_images"] == expected.num_images
