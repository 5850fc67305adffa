"""Training on through unreadable images: skip them, count them, stop when there are too many.

A multi-day run should not die on the one corrupt JPEG it meets after hours, nor silently train on
a dataset that has lost a tenth of its images. Three pieces:

* :class:`SkipUnreadableMapper` wraps the dataset mapper (detectron2's ``DatasetMapper``). When
  the mapper fails and the image itself cannot be read (missing, undecodable, or not the recorded
  size), it logs the file and returns None, on which detectron2's ``MapDataset`` maps another
  random index instead (``detectron2/data/common.py``: a map-style dataset "randomly tries other
  elements"). A failure on a readable image is a bug elsewhere and is raised as is.
* The mapper runs in the dataloader workers, which are separate processes, so it reports what
  it skipped by attaching the file names to the next dict it returns (key :data:`SKIPPED_KEY`).
  :class:`SkipCountingLoader`, around the train loader in the trainer's process, pops them,
  counts skipped and read images, and stops training once the skipped fraction is over the limit.
* :class:`SkippedImagesHook` puts the cumulative count in the event storage as
  ``data/skipped_images`` (metrics.json, TensorBoard).

The limit (``MODEL.LONGTAIL.DATA.MAX_SKIPPED_FRACTION``, f) is judged on at least
:data:`MIN_READS_TO_JUDGE` reads: training stops when skipped > f * max(read, MIN_READS_TO_JUDGE).
So with f = 1% the first bad images cannot stop a run (10 may be skipped in the first 1000
reads), while a dataset that is mostly unreadable stops after a dozen reads rather than after a
thousand. With f = 0 any unreadable image stops training. Reads are counted, not distinct files:
an image sampled again (a later epoch, or repeated by RepeatFactorTrainingSampler) counts again,
which keeps the fraction that of the reads.

Each worker also judges its own reads by the same rule, so that a run in which every read fails
(a data mount gone) stops with the list of files instead of retrying index after index without
ever returning a batch. Counts are per process and per rank, from the start of this process.
"""
import logging
from typing import Iterable, List, Optional, Sequence

from detectron2.data import detection_utils
from detectron2.engine import HookBase

logger = logging.getLogger(__name__)

__all__ = [
    "MIN_READS_TO_JUDGE",
    "SKIPPED_KEY",
    "SkipCountingLoader",
    "SkipUnreadableMapper",
    "SkippedImagesHook",
    "UnreadableImagesError",
]

# Reads before the skipped fraction is judged on the reads themselves (see the module docstring).
MIN_READS_TO_JUDGE = 1000
# Key of the dataset dict under which a worker passes the files it skipped to the main process.
SKIPPED_KEY = "longtail_skipped_images"
# Files listed in the error message (all of them are in the log).
_FILES_IN_MESSAGE = 20


class UnreadableImagesError(RuntimeError):
    """Too many training images could not be read; the message lists them."""


def over_limit(skipped: int, read: int, max_fraction: float,
               min_reads: int = MIN_READS_TO_JUDGE) -> bool:
    """Whether ``skipped`` of ``read`` images is over ``max_fraction``, judged on at least
    ``min_reads`` reads."""
    return skipped > max_fraction * max(read, min_reads)


def _limit_error(skipped_files: Sequence[str], read: int, max_fraction: float, min_reads: int,
                 dataset_names: Sequence[str]) -> UnreadableImagesError:
    unique = list(dict.fromkeys(skipped_files))
    shown = "\n".join(f"  {f}" for f in unique[:_FILES_IN_MESSAGE])
    more = f"\n  ... and {len(unique) - _FILES_IN_MESSAGE} more (see the log)" if len(
        unique) > _FILES_IN_MESSAGE else ""
    names = " ".join(f"--dataset {n}" for n in dataset_names) or "--dataset NAME"
    return UnreadableImagesError(
        f"Training stopped: {len(skipped_files)} of {read} training images read so far could not "
        f"be read, more than MODEL.LONGTAIL.DATA.MAX_SKIPPED_FRACTION = {max_fraction:g} "
        f"(judged on at least {min_reads} reads). The {len(unique)} file(s):\n"
        f"{shown}{more}\nFix or remove these images (python -m longtail.tools.check_dataset "
        f"{names} --full lists every unreadable one), or raise the limit; --resume continues "
        "from the last checkpoint."
    )


class SkipUnreadableMapper:
    """A dataset mapper that skips (returns None for) images that cannot be read.

    Args:
        mapper: the mapper to wrap, e.g. ``DatasetMapper(cfg, is_train=True)``. Its
            ``image_format`` (if any) is used to re-read a failed image.
        max_fraction: MODEL.LONGTAIL.DATA.MAX_SKIPPED_FRACTION; this process raises
            :class:`UnreadableImagesError` once its own reads are over it.
        min_reads: reads before the fraction is judged on the reads themselves.
        dataset_names: the datasets read (named in the error message).
    """

    def __init__(self, mapper, max_fraction: float, *, min_reads: int = MIN_READS_TO_JUDGE,
                 dataset_names: Sequence[str] = ()):
        self.mapper = mapper
        self.max_fraction = max_fraction
        self.min_reads = min_reads
        self.dataset_names = tuple(dataset_names)
        self.image_format = getattr(mapper, "image_format", None)
        self.num_read = 0
        self.skipped_files: List[str] = []  # every skip of this process, for the error message
        self._pending: List[str] = []  # skips not yet passed on with a returned dict

    def __call__(self, dataset_dict: dict) -> Optional[dict]:
        self.num_read += 1
        try:
            mapped = self.mapper(dataset_dict)
        except Exception as error:
            reason = self.unreadable_reason(dataset_dict)
            if reason is None:
                raise  # the image is fine: the failure is not ours to hide
            self._skip(dataset_dict.get("file_name", "<no file_name>"), reason, error)
            return None  # MapDataset maps another index instead
        if mapped is not None and self._pending:
            mapped[SKIPPED_KEY] = self._pending
            self._pending = []
        return mapped

    def unreadable_reason(self, dataset_dict: dict) -> Optional[str]:
        """Why the image of ``dataset_dict`` cannot be used (None when it reads fine), found the
        way DatasetMapper reads it: detectron2's ``read_image`` and ``check_image_size``."""
        try:
            image = detection_utils.read_image(dataset_dict["file_name"], format=self.image_format)
            detection_utils.check_image_size(dict(dataset_dict), image)
        except Exception as e:  # any failure to read is the reason
            return f"{type(e).__name__}: {e}"
        return None

    def _skip(self, file_name: str, reason: str, error: Exception) -> None:
        first_time = file_name not in self.skipped_files
        self.skipped_files.append(file_name)
        self._pending.append(file_name)
        # once per file: an image sampled again fails again, and the log says so already
        log = logger.warning if first_time else logger.debug
        log("Skipping training image %s, which cannot be read (%s); %d of %d reads skipped in "
            "this process.", file_name, reason, len(self.skipped_files), self.num_read)
        if over_limit(len(self.skipped_files), self.num_read, self.max_fraction, self.min_reads):
            raise _limit_error(self.skipped_files, self.num_read, self.max_fraction,
                               self.min_reads, self.dataset_names) from error


class SkipCountingLoader:
    """Wraps the train loader in the trainer's process: takes the skipped files that
    :class:`SkipUnreadableMapper` attached to the dicts of each batch, counts them, and raises
    :class:`UnreadableImagesError` once skipped / read is over ``max_fraction``.

    Attributes:
        num_read: images read so far (those in the batches plus those skipped).
        skipped_files: the file of every skipped read, in order.
    """

    def __init__(self, loader: Iterable, max_fraction: float, *,
                 min_reads: int = MIN_READS_TO_JUDGE, dataset_names: Sequence[str] = ()):
        self.loader = loader
        self.max_fraction = max_fraction
        self.min_reads = min_reads
        self.dataset_names = tuple(dataset_names)
        self.num_read = 0
        self.skipped_files: List[str] = []

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_files)

    def __iter__(self):
        for batch in self.loader:
            for d in batch:
                skipped = d.pop(SKIPPED_KEY, None)
                if skipped:
                    self.skipped_files.extend(skipped)
                    self.num_read += len(skipped)
            self.num_read += len(batch)
            if over_limit(self.num_skipped, self.num_read, self.max_fraction, self.min_reads):
                raise _limit_error(self.skipped_files, self.num_read, self.max_fraction,
                                   self.min_reads, self.dataset_names)
            yield batch


class SkippedImagesHook(HookBase):
    """Puts ``data/skipped_images`` (cumulative skipped reads of this rank's train loader) in the
    event storage after every step. Register it before the writers, so that each write has it."""

    def __init__(self, loader: SkipCountingLoader):
        self._loader = loader

    def after_step(self):
        # each skipped file is logged where it is met (SkipUnreadableMapper); this is the count
        self.trainer.storage.put_scalar(
            "data/skipped_images", self._loader.num_skipped, smoothing_hint=False)
