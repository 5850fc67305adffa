"""Loading checkpoints that may come from outside without running code from them.

``torch.load`` and ``pickle.load`` unpickle: a checkpoint file can name any Python callable and
have it called while it loads. :class:`LongTailCheckpointer` therefore reads

* ``.pth`` (and any other torch file) with ``torch.load(..., weights_only=True)``: tensors,
  containers of tensors and plain Python values only. That is everything a checkpoint of this
  project holds (model, optimizer, LR scheduler, iteration, trainer state), so ``--resume``,
  decoupled stage 2 and ``--eval-only`` load their own files this way. torch 2.3 has no way to
  allow further classes in this mode (``torch.serialization.add_safe_globals`` came with 2.4), so
  a file holding e.g. numpy arrays inside a ``.pth`` needs ``--trust-checkpoint``.
* ``.pkl`` (detectron2 and Caffe2 model-zoo weights such as the ImageNet ``R-50.pkl`` the LVIS
  recipes start from) with a restricted unpickler that builds only numpy arrays, numpy dtypes and
  scalars, and Python's own containers; it returns the same dict detectron2's reader does.
* ``.pyth`` (pycls) is refused: detectron2 reads those with a full ``torch.load``.

Anything that needs more is refused with an :class:`UntrustedCheckpointError` naming the file and
``--trust-checkpoint``, train_net.py's flag (``trust_checkpoint=True`` here) that restores
detectron2's unrestricted loading for files one trusts.

``strict=True`` (``--eval-only``) additionally refuses a checkpoint that does not fill the whole
model: a missing or unexpected model key, a tensor of another shape, or no checkpoint at all,
since evaluating a half-loaded model would report numbers of partly random weights.
"""

import pickle

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

__all__ = ["LongTailCheckpointer", "UntrustedCheckpointError", "IncompleteCheckpointError"]

TRUST_FLAG = "--trust-checkpoint"

# The globals a model-zoo .pkl may name: numpy arrays (and the dtypes and scalars they are built
# from), OrderedDict, and the bytes encoding pickles written by Python 3 use for raw array data.
ARRAY_PICKLE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
}


class UntrustedCheckpointError(pickle.UnpicklingError):
    """A checkpoint needs arbitrary unpickling and ``--trust-checkpoint`` was not given."""


class IncompleteCheckpointError(RuntimeError):
    """A strict load (``--eval-only``) found a checkpoint that does not fill the whole model."""


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in ARRAY_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"the file names the global {module}.{name}")


def _refusal(filename: str, reason: str) -> UntrustedCheckpointError:
    return UntrustedCheckpointError(
        f"Refusing to load {filename}: {reason}. Unpickling it could run arbitrary code chosen by "
        f"whoever wrote the file. If you trust where it comes from, pass {TRUST_FLAG} to "
        "train_net.py to load it with detectron2's unrestricted loader; otherwise re-save its "
        "tensors from a trusted environment, e.g. torch.save({'model': state_dict}, 'x.pth')."
    )


class LongTailCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` with safe loading (see the module docstring).

    Args:
        model, save_dir, checkpointables: as for :class:`DetectionCheckpointer`.
        trust_checkpoint: load any file with detectron2's unrestricted ``pickle``/``torch.load``
            (train_net.py's ``--trust-checkpoint``).
        strict: refuse a load that leaves a model parameter or buffer unset, or that brings keys
            the model does not have (``--eval-only``).
    """

    def __init__(
        self,
        model,
        save_dir: str = "",
        *,
        trust_checkpoint: bool = False,
        strict: bool = False,
        **checkpointables,
    ):
        super().__init__(model, save_dir, **checkpointables)
        self.trust_checkpoint = bool(trust_checkpoint)
        self.strict = bool(strict)
        self._loading = None

    # ------------------------------------------------------------------ reading files

    def _load_file(self, filename):
        if self.trust_checkpoint:
            return super()._load_file(filename)
        if filename.endswith(".pkl"):
            return self._load_model_zoo_pickle(filename)
        if filename.endswith(".pyth"):
            raise _refusal(filename, "pycls .pyth files are read with a full torch.load")
        return super()._load_file(filename)  # goes through _torch_load below

    def _torch_load(self, f):
        if self.trust_checkpoint:
            return super()._torch_load(f)
        try:
            return torch.load(f, map_location=torch.device("cpu"), weights_only=True)
        except pickle.UnpicklingError as e:
            # torch prefixes its own advice (weights_only=False) before the actual reason.
            reason = str(e).rsplit("WeightsUnpickler error: ", 1)[-1]
            raise _refusal(f, f"it holds more than tensors and plain values ({reason})") from e

    def _load_model_zoo_pickle(self, filename):
        """A detectron2 or Caffe2 model-zoo ``.pkl`` as the dict detectron2's reader returns."""
        with PathManager.open(filename, "rb") as f:
            try:
                # latin1: Caffe2 files were written by Python 2 (str array data).
                data = _ArraysOnlyUnpickler(f, encoding="latin1").load()
            except pickle.UnpicklingError as e:
                raise _refusal(
                    filename, f"{e}, and a model-zoo .pkl may only hold numpy arrays"
                ) from e
        if not isinstance(data, dict):
            raise ValueError(
                f"{filename} is not a model-zoo .pkl: it holds a {type(data).__name__}, not a dict"
            )
        if "model" in data and "__author__" in data:
            return data  # detectron2 model-zoo format, converted by _load_model as it says
        # Caffe2 / Detectron1 model zoo: detection models keep their arrays under "blobs";
        # the optimizer's "_momentum" arrays are not model weights.
        weights = data.get("blobs", data)
        weights = {k: v for k, v in weights.items() if not k.endswith("_momentum")}
        return {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}

    # ------------------------------------------------------------------ strict loading

    def load(self, path, *args, **kwargs):
        self._loading = {"path": path, "model_loaded": False}
        try:
            ret = super().load(path, *args, **kwargs)
            if self.strict and not self._loading["model_loaded"]:
                raise IncompleteCheckpointError(
                    "No checkpoint was loaded (MODEL.WEIGHTS is empty, or this process cannot "
                    f"read {path!r}), so every weight of the model would be random. Pass the "
                    "weights to evaluate as MODEL.WEIGHTS path/to/model_final.pth, or --resume to "
                    "use the last checkpoint in OUTPUT_DIR."
                )
            return ret
        finally:
            self._loading = None

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        if self._loading is not None:
            self._loading["model_loaded"] = True
        if self.strict and incompatible is not None:
            self._check_complete(incompatible)
        return incompatible

    def _check_complete(self, incompatible):
        path = self._loading["path"] if self._loading else "the checkpoint"
        problems = []
        for what, keys in (
            ("model keys missing from it", incompatible.missing_keys),
            ("keys in it that the model does not have", incompatible.unexpected_keys),
            (
                "tensors with another shape than the model's",
                [
                    f"{k} {tuple(got)} vs {tuple(want)}"
                    for k, got, want in incompatible.incorrect_shapes
                ],
            ),
        ):
            if keys:
                shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
                problems.append(f"{len(keys)} {what} ({shown})")
        if problems:
            raise IncompleteCheckpointError(
                f"{path} does not match the model built from this config: "
                + "; ".join(problems)
                + ". Evaluating it would use random weights for what is missing. Pass the config "
                "the checkpoint was trained with (its OUTPUT_DIR/config.yaml) together with it, or "
                "the model_final.pth of a run of this config."
            )
