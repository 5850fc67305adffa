"""Shared fixtures of the longtail test suite.

DETECTRON2_DATASETS
    Set at the top of this file, before any test module imports ``longtail``, to a fresh folder
    made with ``tempfile.mkdtemp`` (``SHAPES_LT_DATASETS`` below); the folder is deleted and the
    previous value restored when the session ends (``pytest_unconfigure``). This has to happen at
    import time: ``import longtail`` calls ``register_shapes_lt()``, which reads the variable once
    and fixes where ``shapes_lt_train`` / ``shapes_lt_val`` / ``shapes_lt_val_mini`` are loaded
    from. Tests therefore never read or write the user's ``datasets/`` folder or an existing
    ``$DETECTRON2_DATASETS``, and subprocesses started by tests (e.g. ``train_net.py
    --num-gpus 2``) inherit the variable and see the same data.

shapes_lt_root (session fixture)
    Generates the default shapes-lt dataset (``ShapesLTSpec()``, about 10 s) once per session into
    ``$DETECTRON2_DATASETS/shapes_lt`` and returns that path. Every test that loads a shapes-lt
    split -- ``DatasetCatalog.get("shapes_lt_*")``, a trainer, an evaluator, ``train_net.py`` --
    must request it, so that generation is done (and timed) here once and never inside a test.
"""

import os
import shutil
import sys
import tempfile

import pytest

if "longtail" in sys.modules:  # pragma: no cover - a plugin imported it before this file ran
    raise RuntimeError(
        "longtail was imported before tests/conftest.py could set DETECTRON2_DATASETS; the "
        "shapes-lt splits would point at the user's datasets folder. Remove the early import."
    )

_PREVIOUS_DETECTRON2_DATASETS = os.environ.get("DETECTRON2_DATASETS")
SHAPES_LT_DATASETS = tempfile.mkdtemp(prefix="longtail-tests-datasets-")
os.environ["DETECTRON2_DATASETS"] = SHAPES_LT_DATASETS


def pytest_unconfigure(config):
    shutil.rmtree(SHAPES_LT_DATASETS, ignore_errors=True)
    if _PREVIOUS_DETECTRON2_DATASETS is None:
        os.environ.pop("DETECTRON2_DATASETS", None)
    else:
        os.environ["DETECTRON2_DATASETS"] = _PREVIOUS_DETECTRON2_DATASETS


@pytest.fixture(scope="session")
def shapes_lt_root():
    """Path of the default shapes-lt dataset, generated once per session (see module docstring)."""
    from detectron2.data import MetadataCatalog

    from longtail.data.shapes_lt import ShapesLTSpec, ensure_shapes_lt

    root = os.path.join(SHAPES_LT_DATASETS, "shapes_lt")
    registered = MetadataCatalog.get("shapes_lt_train").json_file
    if os.path.dirname(registered) != root:
        raise RuntimeError(
            f"shapes_lt_train is registered at {registered!r}, not under {root!r}: longtail was "
            "imported before tests/conftest.py set DETECTRON2_DATASETS."
        )
    return ensure_shapes_lt(root, ShapesLTSpec())
