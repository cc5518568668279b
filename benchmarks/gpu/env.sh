# Sourced by benchmarks/gpu/run.sh and benchmarks/device_run.sh: make what travelled importable.
# Sets PY (the interpreter to use) and PYTHONPATH. On the device machine (Python 3.12, no registry):
#   .device/serve-site-py312.tar.xz   Ray Serve + Redis (../shared/tools/device-serve-bundle.sh)
#   .whl/*.whl                        pydantic, pydantic-settings, nibabel, ... (benchmarks/gpu/pack.sh)
#   .gpu-models/*.whl, text_vectors.json   LiteMedSAM's wheel, the class-text vectors
# Everything is unpacked into .gpu-site/ in the checkout (git-ignored): ignored paths stay on a warm
# device machine between calls, so a later call that carries other things still finds them.
ROOT=${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
SITE=$ROOT/.gpu-site
if [ -x "$ROOT/.venv/bin/python" ]; then
  # the development machine: the project's own environment has everything; nothing to unpack
  PY=$ROOT/.venv/bin/python
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
else
  PY=python3
  if [ -f "$ROOT/.device/serve-site-py312.tar.xz" ] && [ ! -f "$SITE/serve/.unpacked" ]; then
    mkdir -p "$SITE/serve" && tar xJf "$ROOT/.device/serve-site-py312.tar.xz" -C "$SITE/serve" && touch "$SITE/serve/.unpacked"
  fi
  for dir in .whl .gpu-models; do
    if ls "$ROOT/$dir"/*.whl >/dev/null 2>&1; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE/wheels" "$ROOT/$dir"/*.whl
    fi
  done
  if [ -f "$ROOT/.gpu-models/text_vectors.json" ]; then
    mkdir -p "$SITE" && cp "$ROOT/.gpu-models/text_vectors.json" "$SITE/text_vectors.json"
  fi
  [ -f "$SITE/text_vectors.json" ] && export VESSA_TEXT_VECTORS=$SITE/text_vectors.json
  export PYTHONPATH=$ROOT:$SITE/wheels:$SITE/serve${PYTHONPATH:+:$PYTHONPATH}
  export PATH=$SITE/serve/bin:$SITE/wheels/bin:$PATH
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
