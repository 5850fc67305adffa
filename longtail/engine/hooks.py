"""Training hooks of the long-tail methods. They read and report; the statistics themselves live in
the predictors' buffers (so checkpoints carry them)."""
import json
import logging
import os

from detectron2.engine import HookBase
from detectron2.utils import comm

logger = logging.getLogger(__name__)

__all__ = ["ECMBackgroundRatioHook"]


class ECMBackgroundRatioHook(HookBase):
    """Reports ECM's background ratio r once it is measured (``MODEL.LONGTAIL.ECM.MEASURE_BG_RATIO``).

    The predictor counts the fg/bg labels of its sampled RoIs over the first iterations, summed
    over ranks, and freezes r; this hook logs r, puts it in the event storage (``ecm/bg_ratio``)
    and writes ``OUTPUT_DIR/ecm_bg_ratio.json`` on the main rank.
    """

    def __init__(self, predictor, output_dir: str):
        self._predictor = predictor
        self._path = os.path.join(output_dir, "ecm_bg_ratio.json")
        self._reported = False

    def before_train(self):
        if bool(self._predictor.ecm_ratio_frozen):  # resumed after the measurement
            logger.info("ECM: background ratio r = %.4f (restored from the checkpoint)",
                        float(self._predictor.ecm_bg_ratio))
            self._reported = True

    def after_step(self):
        if self._reported or not bool(self._predictor.ecm_ratio_frozen):
            return
        self._reported = True
        ratio = float(self._predictor.ecm_bg_ratio)
        num_fg, num_bg = self._predictor.ecm_fg_bg_counts.tolist()
        iters = int(self._predictor.ecm_measured_iters)
        logger.info("ECM: measured background ratio r = #bg/#fg = %.0f/%.0f = %.4f over %d iterations",
                    num_bg, num_fg, ratio, iters)
        self.trainer.storage.put_scalar("ecm/bg_ratio", ratio, smoothing_hint=False)
        if comm.is_main_process():
            with open(self._path, "w") as f:
                json.dump({"bg_ratio": ratio, "num_fg_rois": num_fg, "num_bg_rois": num_bg,
                           "iterations": iters, "end_iter": self.trainer.iter}, f, indent=1)
