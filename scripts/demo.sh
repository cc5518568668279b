#!/usr/bin/env bash
# The main job on the embedded default: synthetic data, local Ray, an embedded Redis. See README.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/vessa demo "$@"
