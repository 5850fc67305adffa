# longtail for multi-GPU training runs.
#
#   docker build -t longtail:cu121 --build-arg USER_UID="$(id -u)" --build-arg USER_GID="$(id -g)" .
#   mkdir -p output    # create it yourself: a folder Docker creates for -v belongs to root
#   docker run --rm --gpus all --shm-size 8g \
#       -v /path/to/detectron2_datasets:/datasets -v "$PWD/output":/output \
#       longtail:cu121 python train_net.py --num-gpus 8 \
#       --config-file configs/LVISv1/ce_rfs_mask_rcnn_R_50_FPN_1x.yaml OUTPUT_DIR /output/run1
#
# The environment is the one DESIGN.md pins: the sal-detectron2 wheel (cp310 only, compiled ops
# built against torch 2.3) needs Python 3.10, torch 2.3.1 and torchvision 0.18.1.

# The official PyTorch 2.3.1 / CUDA 12.1 image already holds torch 2.3.1 and torchvision 0.18.1
# (the exact pins) with their CUDA and NCCL libraries, and its conda Python is 3.10. The runtime
# flavour is enough: sal-detectron2 ships its ops prebuilt and every other dependency is a binary
# wheel or pure Python, so nothing needs nvcc or a C++ compiler. To build upstream detectron2 from
# source instead, pass --build-arg BASE_IMAGE=pytorch/pytorch:2.3.1-cuda12.1-cudnn8-devel.
ARG BASE_IMAGE=pytorch/pytorch:2.3.1-cuda12.1-cudnn8-runtime
FROM ${BASE_IMAGE}

# The unprivileged user that runs training. Pass your own ids (--build-arg USER_UID="$(id -u)"
# --build-arg USER_GID="$(id -g)") so that checkpoints written to a bind-mounted /output belong
# to you on the host.
ARG USER_NAME=longtail
ARG USER_UID=1000
ARG USER_GID=1000

# Unbuffered output, so that every rank's log lines reach `docker logs` as they are printed;
# DETECTRON2_DATASETS is where longtail and detectron2 look for lvis/, coco/ and shapes_lt/.
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DETECTRON2_DATASETS=/datasets

# Stop here, with a clear message, if the base image's Python is not 3.10: the cp310-only
# detectron2 wheel would otherwise fail later with a confusing resolver error. Then create the
# user, with a home where iopath caches downloaded weights and matplotlib its config (a group that
# already has USER_GID is reused), and the folders it must own: the project, the dataset root
# (shapes-lt is generated there) and /output.
RUN python -c "import sys; v = sys.version_info[:2]; assert v == (3, 10), \
'sal-detectron2 is a cp310-only wheel, but this base image has Python %d.%d' % v" \
 && (getent group "${USER_GID}" >/dev/null || groupadd --gid "${USER_GID}" "${USER_NAME}") \
 && useradd --uid "${USER_UID}" --gid "${USER_GID}" --create-home --shell /bin/bash "${USER_NAME}" \
 && install -d -o "${USER_UID}" -g "${USER_GID}" /workspace/longtail /datasets /output

WORKDIR /workspace/longtail

# Dependencies first, in their own layer, so that editing the code does not reinstall them.
# requirements.txt is the same file `make` uses; its torch/torchvision pins are already met by the
# image, so pip keeps the image's CUDA build. lvis pulls in opencv-python (the GUI build), which
# shares the cv2 folder with opencv-python-headless and needs libGL, absent from this image:
# remove it and reinstall the headless build at the resolved version so that `import cv2` works
# without any apt packages. The last command fails the build if torch or torchvision was replaced
# or the detectron2 ops, cv2 or lvis do not import.
COPY requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt \
 && headless="$(python -c "from importlib.metadata import version; print(version('opencv-python-headless'))")" \
 && pip uninstall -y opencv-python \
 && pip install --no-cache-dir --no-deps --force-reinstall "opencv-python-headless==${headless}" \
 && python -c "import torch, torchvision, cv2, lvis, faster_coco_eval; \
from detectron2 import _C; \
assert torch.__version__.split('+')[0] == '2.3.1', torch.__version__; \
assert torchvision.__version__.split('+')[0] == '0.18.1', torchvision.__version__" \
 && rm /tmp/requirements.txt

# The project itself, editable as in `make setup` (--no-deps: everything is installed above;
# --no-build-isolation: build with the pinned setuptools instead of downloading another one).
# The install runs as root because site-packages belongs to root; the checkout then goes to the
# user, so that it can write in its working directory.
COPY --chown=${USER_UID}:${USER_GID} . /workspace/longtail
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e . \
 && chown -R "${USER_UID}:${USER_GID}" /workspace/longtail

# Mount points: datasets (read-only is fine once shapes-lt exists) and run outputs.
VOLUME ["/datasets"]
VOLUME ["/output"]

USER ${USER_NAME}

# No ENTRYPOINT: `docker run IMAGE python train_net.py --num-gpus 8 ...` replaces this CMD, which
# only prints the options. Multi-GPU runs need --shm-size (or --ipc=host) for NCCL and the data
# loader workers.
CMD ["python", "train_net.py", "--help"]
