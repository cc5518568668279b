#!/usr/bin/env bash
# Build the VESSA image (deploy/Dockerfile) from a local wheelhouse: no image registry, no package index
# at build time.
#
#   scripts/docker-build.sh            CPU image vessa:cpu on the local Debian base (scripts/docker-base.sh)
#   scripts/docker-build.sh --gpu      GPU image vessa:gpu on a CUDA base (needs that base image)
#   options: --tag TAG  --base IMAGE  --freeze (regenerate deploy/docker/constraints.txt from .venv first)
#   env: WHEELHOUSE (default .wheelhouse), DOCKER_BUILD_ARGS (extra `docker build` options)
#
# 1. wheelhouse: vessa/ holds VESSA's own wheel (rebuilt every time), deps/ every pinned dependency
#    (`pip download --only-binary=:all: -c deploy/docker/constraints.txt`; redone only when the
#    constraints or the runtime dependencies in pyproject.toml change). The image installs from it with `--no-index`.
# 2. base image: for the CPU image, vessa-base:bookworm is made with debootstrap when missing.
# 3. `docker build` with BuildKit (the wheelhouse is bind-mounted into the install step, not copied).
set -euo pipefail
cd "$(dirname "$0")/.."
variant=cpu
tag=""
base=""
freeze=0
while [ $# -gt 0 ]; do
  case "$1" in
    --gpu) variant=gpu; shift ;;
    --cpu) variant=cpu; shift ;;
    --tag) tag=$2; shift 2 ;;
    --base) base=$2; shift 2 ;;
    --freeze) freeze=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-.venv/bin/python}
WHEELHOUSE=${WHEELHOUSE:-.wheelhouse}
CONSTRAINTS=deploy/docker/constraints.txt

if [ "$freeze" = 1 ]; then
  {
    echo "# Pinned from the development venv (pip freeze, editable vessa excluded). Regenerate: scripts/docker-build.sh --freeze"
    "$PY" -m pip freeze --exclude-editable | grep -v -E '^(-e |vessa[= @])'
    echo "# Not in the venv (Python 3.11.7) but needed on Debian 12's Python 3.11.2: redis requires it before 3.11.3"
    echo "async-timeout==5.0.1"
  } >"$CONSTRAINTS.new"
  mv "$CONSTRAINTS.new" "$CONSTRAINTS"
fi

# 1. wheelhouse ---------------------------------------------------------------------------------------
# deps/ and vessa/ are separate build mounts, so new VESSA code rebuilds only the small VESSA layer.
mkdir -p "$WHEELHOUSE/deps" "$WHEELHOUSE/vessa"
rm -f "$WHEELHOUSE"/vessa/vessa-*.whl
"$PY" -m pip wheel -q --no-deps -w "$WHEELHOUSE/vessa" . 2>&1 | grep -v -E "^\s*$|!!|corresp|warn" || true
ls "$WHEELHOUSE"/vessa/vessa-*.whl >/dev/null
# keyed on what decides the wheel set: the constraints and VESSA's runtime dependencies (not its dev
# extras, package data or version)
want=$({ cat "$CONSTRAINTS"; "$PY" -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'])"; } | sha256sum | cut -d' ' -f1)
if [ "$(cat "$WHEELHOUSE/deps/.stamp" 2>/dev/null)" != "$want" ]; then
  echo "filling $WHEELHOUSE/deps (pip download of the pinned dependencies)…" >&2
  rm -f "$WHEELHOUSE"/deps/*.whl
  "$PY" -m pip download -q -d "$WHEELHOUSE/deps" --only-binary=:all: -c "$CONSTRAINTS" "$WHEELHOUSE"/vessa/vessa-*.whl
  rm -f "$WHEELHOUSE"/deps/vessa-*.whl
  # Requirements behind markers this interpreter does not match but the image's may (python_full_version).
  "$PY" -m pip download -q -d "$WHEELHOUSE/deps" --only-binary=:all: --no-deps -c "$CONSTRAINTS" async-timeout
  echo "$want" >"$WHEELHOUSE/deps/.stamp"
fi
echo "wheelhouse: $(find "$WHEELHOUSE" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1)" >&2

# 2. base image ---------------------------------------------------------------------------------------
build_args=()
if [ "$variant" = cpu ]; then
  tag=${tag:-vessa:cpu}
  if [ -z "$base" ]; then
    base=vessa-base:bookworm
    docker image inspect "$base" >/dev/null 2>&1 || bash scripts/docker-base.sh "$base"
  fi
else
  tag=${tag:-vessa:gpu}
  # CUDA 13 user-space libraries come with torch's wheels; the base brings the OS and Python 3.11.
  base=${base:-nvidia/cuda:13.0.2-base-ubuntu22.04}
  build_args+=(--build-arg PYTHON=python3.11 --build-arg "PYTHON_PACKAGES=python3.11 python3.11-venv")
fi

# 3. build ----------------------------------------------------------------------------------------------
# BuildKit is needed for the bind mount. A Docker CLI with the buildx plugin does it; a 20.10 CLI
# (Debian's docker.io) has BuildKit built in; a newer CLI without buildx has none.
builder=()
if docker buildx version >/dev/null 2>&1; then
  builder=(docker buildx build --load)
else
  for cli in docker /usr/bin/docker; do
    command -v "$cli" >/dev/null || continue
    v=$("$cli" version -f '{{.Client.Version}}' 2>/dev/null || echo 99)
    if [ "${v%%.*}" -lt 23 ] 2>/dev/null; then
      builder=(env DOCKER_BUILDKIT=1 "$cli" build)
      break
    fi
  done
fi
if [ ${#builder[@]} -eq 0 ]; then
  echo "no BuildKit builder: install the docker buildx plugin (or Debian's docker.io CLI)" >&2
  exit 1
fi
read -r -a extra <<<"${DOCKER_BUILD_ARGS:-}"
start=$(date +%s)
"${builder[@]}" -f deploy/Dockerfile --build-arg "BASE_IMAGE=$base" "${build_args[@]}" "${extra[@]}" -t "$tag" .
secs=$(($(date +%s) - start))
size=$(docker image inspect -f '{{.Size}}' "$tag")
echo "built $tag on $base in ${secs} s; image size $((size / 1000000)) MB"
