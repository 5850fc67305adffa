#!/usr/bin/env python
"""Train or evaluate a long-tailed detector with longtail.

    python train_net.py --config-file configs/ShapesLT/ce_mask_rcnn_R_18_FPN_demo.yaml
    python train_net.py --config-file CONFIG --num-gpus 8 [--resume] [KEY VALUE ...]
    python train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS path/to/model.pth

The method is picked in the config (MODEL.LONGTAIL.PREDICTOR, see README.md); this script only
parses the command line, builds the config and hands over to LongTailTrainer.
"""
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from longtail import add_longtail_config
from longtail.engine import LongTailTrainer, check_output_dir


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


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = LongTailTrainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = LongTailTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = LongTailTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
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
