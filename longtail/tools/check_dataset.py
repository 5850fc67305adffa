"""Check a detection dataset before training on it: schema, ids, boxes, polygons, image files.

    python -m longtail.tools.check_dataset --dataset lvis_v1_train
    python -m longtail.tools.check_dataset --dataset my_train --full --max-records 50
    python -m longtail.tools.check_dataset --json annotations.json --image-root images/
    python -m longtail.tools.check_dataset --config-file CONFIG [KEY VALUE ...]

``--dataset`` names a registered dataset (detectron2's builtins, longtail's shapes-lt, or one the
config registers) and checks the dicts training reads; it may be given more than once. With only
``--config-file`` every dataset of its ``DATASETS.TRAIN`` is checked. ``--json`` checks a raw
LVIS/COCO-format file instead (its image files too, given ``--image-root``). ``--full`` also
decodes every image and compares its size with the recorded one (minutes at LVIS scale; the
default checks only that the files exist).

What is checked, and which problems are errors: longtail/data/preflight.py. Prints a summary
(counts per problem, the first offending records); exits with 0 when there is no error (warnings
allowed) and 1 otherwise.
"""
import argparse
import logging
import sys
from typing import List, Optional

__all__ = ["main"]


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m longtail.tools.check_dataset",
        description="Check a detection dataset (LVIS/COCO json or a registered detectron2 "
        "dataset) for problems that would crash or spoil training.",
    )
    parser.add_argument("--dataset", action="append", default=[], metavar="NAME",
                        help="a registered dataset name (repeatable); with --json, the name the "
                        "summary uses")
    parser.add_argument("--json", metavar="PATH", help="an LVIS/COCO-format annotation json")
    parser.add_argument("--image-root", metavar="DIR",
                        help="the folder of the --json images (without it, files are not "
                        "checked)")
    parser.add_argument("--full", action="store_true",
                        help="also decode every image and compare its size with the recorded one")
    parser.add_argument("--max-records", type=int, default=5, metavar="N",
                        help="offending records shown per problem (default 5)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="threads decoding images with --full (default: up to 8 cores)")
    parser.add_argument("--config-file", metavar="CFG",
                        help="a training config: its DATASETS.TRAIN are checked when no "
                        "--dataset is given")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides, as for train_net.py")
    return parser


def _config_datasets(config_file: str, opts: List[str]) -> List[str]:
    from detectron2.config import get_cfg

    from longtail import add_longtail_config

    cfg = get_cfg()
    add_longtail_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    return list(cfg.DATASETS.TRAIN)


def main(argv: Optional[List[str]] = None) -> int:
    args = argument_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.opts and not args.config_file:
        argument_parser().error("KEY VALUE overrides need --config-file")
    if args.image_root and not args.json:
        argument_parser().error("--image-root goes with --json")

    # Importing longtail registers its datasets (and detectron2's builtins), as train_net.py does.
    import longtail  # noqa: F401
    from longtail.data.preflight import check_lvis_json, check_registered_dataset

    options = dict(full=args.full, max_records=args.max_records, workers=args.workers)
    if args.json:
        if len(args.dataset) > 1:
            argument_parser().error("--json checks one file: give at most one --dataset name")
        name = args.dataset[0] if args.dataset else None
        reports = [check_lvis_json(args.json, args.image_root, name=name, **options)]
    else:
        names = args.dataset or (
            _config_datasets(args.config_file, args.opts) if args.config_file else [])
        if not names:
            argument_parser().error("give --dataset NAME, --json PATH or --config-file CFG")
        reports = [check_registered_dataset(n, **options) for n in names]

    for report in reports:
        print(report.summary())
        print()
    failed = [r.dataset for r in reports if not r.ok]
    if failed:
        print(f"Errors in: {', '.join(failed)}. Fix them before training (the preflight at the "
              "start of training would stop on them).")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
