"""Two-process (gloo, CPU) runs for the tests, with a clean teardown."""
import os
import sys

import torch.distributed as dist
from detectron2.engine import launch
from detectron2.utils import comm


def _run_then_leave_together(worker, args):
    worker(*args)
    # Both ranks finish their collectives, then the process group is torn down before the
    # interpreter exits: left to interpreter shutdown, gloo's threads sometimes aborted a rank
    # ("terminate called without an active exception") after the test's work was done.
    comm.synchronize()
    dist.destroy_process_group()
    # Even after the teardown, a rank still aborted now and then in interpreter shutdown
    # (a clean-clone CI run: "terminate called without an active exception", SIGABRT), after its
    # work was done and its files written. The rank's work is over here, so it leaves without
    # running interpreter shutdown; exit status 0 is what the launcher checks.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch_two_ranks(worker, *args):
    """Run ``worker(*args)`` on 2 ranks over gloo with detectron2's launcher."""
    launch(_run_then_leave_together, 2, dist_url="auto", args=(worker, args))
