#!/usr/bin/env python
"""Train or evaluate a long-tailed detector with longtail.

    python train_net.py --config-file configs/ShapesLT/ce_mask_rcnn_R_18_FPN_demo.yaml
    python train_net.py --config-file CONFIG --num-gpus 8 [--resume] [KEY VALUE ...]
    python train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS path/to/model.pth

The method is picked in the config (MODEL.LONGTAIL.PREDICTOR, see README.md); this script only
parses the command line, builds the config and hands over to LongTailTrainer.

Besides detectron2's usual options:

--trust-checkpoint
    Load MODEL.WEIGHTS and resumed checkpoints with detectron2's unrestricted unpickling. By
    default checkpoints are read without running code from them: ``.pth`` files with
    ``torch.load(weights_only=True)`` (tensors and plain values: this project's own checkpoints,
    optimizer and scheduler included), model-zoo ``.pkl`` files with an unpickler that builds only
    numpy arrays; a file that needs more (e.g. pickled custom classes) is refused with a message
    naming this flag. Give it only for files from a source you trust.

--eval-only loads MODEL.WEIGHTS (or, with --resume, OUTPUT_DIR's last checkpoint) strictly: a
model parameter or buffer missing from the file, a key the model does not have, another shape, or
no file at all stops with an error instead of evaluating a partly random model.
"""
import os

import torch
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from longtail import add_longtail_config
from longtail.engine import LongTailTrainer, check_output_dir
from longtail.engine.checkpoint import LongTailCheckpointer


def setup(args):
    cfg = get_cfg()
    add_longtail_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    # Evaluating next to the checkpoints of a run is expected; a fresh training run over them is not.
    check_output_dir(cfg, resume=args.resume or args.eval_only)
    if cfg.MODEL.DEVICE == "cpu" and comm.get_local_size() > 1:
        # One process per "GPU" on CPU: share the cores instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.get_local_size()))
    default_setup(cfg, args)
    # longtail's own log lines (class statistics, evaluation tables, method statistics) go to the
    # console and OUTPUT_DIR/log.txt like detectron2's.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="longtail")
    return cfg


def argument_parser():
    """detectron2's default argument parser plus this script's ``--trust-checkpoint``."""
    parser = default_argument_parser()
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load MODEL.WEIGHTS and resumed checkpoints with unrestricted unpickling (only for "
        "files from a trusted source); by default only tensors, plain values and numpy arrays "
        "are read",
    )
    return parser


def main(args):
    cfg = setup(args)
    # Namespaces from detectron2's plain parser (no --trust-checkpoint) are accepted too.
    trust_checkpoint = getattr(args, "trust_checkpoint", False)
    if args.eval_only:
        model = LongTailTrainer.build_model(cfg)
        # Strict: a checkpoint that does not fill the whole model is an error, not a half-random
        # evaluation.
        LongTailCheckpointer(
            model, save_dir=cfg.OUTPUT_DIR, trust_checkpoint=trust_checkpoint, strict=True
        ).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = LongTailTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = LongTailTrainer(cfg, trust_checkpoint=trust_checkpoint)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main() -> None:
    args = argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()  # pragma: no cover
