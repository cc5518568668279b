#!/usr/bin/env bash
# The end-to-end Docker test by hand (docs/deploy.md): a Docker engine (scripts/docker-setup.sh), then
# tests/e2e/test_deploy_docker.py with VESSA_DOCKER_TEST=1: build the CPU image from the local wheelhouse,
# compose up with the CPU override, a pseudo-label over REST, a short trainer run, compose down.
# Its timings are printed and written to runs/docker-test/timings.json.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/docker-setup.sh
VESSA_DOCKER_TEST=1 exec .venv/bin/python -m pytest -p no:cacheprovider -s -v tests/e2e/test_deploy_docker.py "$@"
