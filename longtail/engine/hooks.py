"""Training hooks of the long-tail methods. They read and report; the statistics themselves live in
the predictors' buffers (so checkpoints carry them)."""
import json
import logging
import os

from detectron2.engine import HookBase
from detectron2.utils import comm

logger = logging.getLogger(__name__)

__all__ = ["ECMBackgroundRatioHook", "PCBConfusionHook"]


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


class PCBConfusionHook(HookBase):
    """Reports PCB's confusion matrix (the matrix itself is a buffer of the ROI heads' PCB head,
    updated in the training forward pass from statistics summed over ranks).

    Every ``period`` iterations it puts in the event storage: ``pcb/seen_fraction`` (classes with
    a foreground proposal so far), ``pcb/active``, ``pcb/pairwise_bias`` (||M - M^T||_F, the
    paper's PwB, on the training matrix) and ``pcb/diag_{r,c,f}`` (mean of M[i, i] per frequency
    group). At ``start_iter`` it warns if unseen classes keep the regulariser off. At every
    checkpoint and at the end, the main rank writes ``OUTPUT_DIR/pcb_confusion_<iter>.png``: M with
    classes sorted by training instance count (most frequent first), log colour scale, like the
    paper's Figure 1.
    """

    def __init__(self, pcb_head, class_stats, output_dir: str, period: int, checkpoint_period: int):
        self._heads = pcb_head
        self._stats = class_stats
        self._output_dir = output_dir
        self._period = max(1, int(period))
        self._checkpoint_period = int(checkpoint_period)

    def _diagnostics(self):
        import torch

        matrix = self._heads.confusion.pcb_cm
        seen = self._heads.confusion.pcb_seen
        values = {
            "pcb/seen_fraction": float((seen > 0).double().mean()),
            "pcb/active": float(self._heads.active()),
            "pcb/pairwise_bias": float(torch.linalg.norm(matrix - matrix.t())),
        }
        diagonal = matrix.diagonal()
        for group in ("r", "c", "f"):
            members = [i for i, f in enumerate(self._stats.frequency) if f == group]
            if members:
                values[f"pcb/diag_{group}"] = float(diagonal[members].mean())
        return values

    def before_step(self):
        # In before_step, so the values carry this iteration and detectron2's writers, which run
        # in after_step, include them; put in after_step they would miss the write at this
        # iteration and be skipped by the next one as already written.
        iteration = self.trainer.iter
        if (iteration + 1) % self._period == 0 or iteration + 1 == self.trainer.max_iter:
            self.trainer.storage.put_scalars(**self._diagnostics(), smoothing_hint=False)

    def after_step(self):
        iteration = self.trainer.iter
        if iteration == self._heads.start_iter and self._heads.require_all_seen:
            unseen = int((self._heads.confusion.pcb_seen == 0).sum())
            if unseen:
                logger.warning(
                    "PCB: %d classes have had no foreground proposal yet, so the regulariser stays "
                    "off until they do (MODEL.LONGTAIL.PCB.REQUIRE_ALL_SEEN). On a dataset where a "
                    "class never appears in training, set REQUIRE_ALL_SEEN False.", unseen
                )
        at_checkpoint = self._checkpoint_period > 0 and (iteration + 1) % self._checkpoint_period == 0
        if comm.is_main_process() and (at_checkpoint or iteration + 1 == self.trainer.max_iter):
            self.write_heatmap(os.path.join(self._output_dir, f"pcb_confusion_{iteration + 1:07d}.png"))

    def write_heatmap(self, path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm

        matrix = self._heads.confusion.pcb_cm.detach().cpu().double()
        order = sorted(range(len(self._stats.instance_count)), key=lambda i: -self._stats.instance_count[i])
        shown = matrix[order][:, order].clamp(min=1e-6).numpy()
        fig, ax = plt.subplots(figsize=(6, 5))
        image = ax.imshow(shown, norm=LogNorm(vmin=1e-6, vmax=1.0), cmap="viridis", interpolation="nearest")
        fig.colorbar(image, ax=ax, label="EMA of mean predicted probability")
        ax.set_xlabel("predicted class (most frequent first)")
        ax.set_ylabel("ground-truth class (most frequent first)")
        ax.set_title(f"PCB confusion matrix, iteration {self.trainer.iter + 1}")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
