#!/usr/bin/env bash
# The test suite (real redis-server, real local Ray Serve, real HTTP). See README.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/lint-imports --no-cache  # imports only point down the layers (pyproject.toml, docs/architecture.md)
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
