#!/usr/bin/env bash
# Entry point of the VESSA image (deploy/Dockerfile). One image, several roles:
#
#   assistant [vessa serve options]   Ray head + the Serve application + the Redis-stream dispatcher
#                                     (`vessa serve --address auto --stream`); `--replicas auto` keeps the
#                                     Serve config's autoscaling bounds
#   trainer   [vessa train options]   `vessa train` (options from TRAIN_ARGS are appended)
#   worker                            a Ray worker node: `ray start --address=$RAY_HEAD_ADDRESS --block`
#   dispatcher [options]              `vessa dispatcher` against a running Ray cluster (KubeRay path:
#                                     joins it at $RAY_HEAD_ADDRESS as a node without resources)
#   redis     [redis-server options]  Redis with AOF persistence and `noeviction`
#   init-data                         only the demo data step below, then exit
#   anything else                     executed as given (`docker run ... vessa:cpu bash`)
#
# Demo data on empty volumes: `assistant` and `trainer` first make sure the data they need exists.
# If $VESSA_BANK_DIR (default /data/bank) has no manifest.json, the bank is built from
# $VESSA_BANK_SOURCE (default: the synthetic dataset in /data/synth, generated first when it is
# missing: $VESSA_SYNTH_CASES cases, seed $VESSA_SYNTH_SEED). The first $VESSA_BANK_LABELED patients
# are the labeled ones. A file lock on the data volume makes concurrent containers take turns, and
# each result is written to a temporary directory and renamed, so a crash leaves no half-built bank.
# VESSA_INIT_DATA=0 turns the step off (a real dataset and bank are mounted).
set -euo pipefail

log() { echo "[vessa-entrypoint] $*" >&2; }

DATA_DIR=${VESSA_DATA_DIR:-/data}
SYNTH_DIR=${VESSA_SYNTH_DIR:-$DATA_DIR/synth}
BANK_DIR=${VESSA_BANK_DIR:-$DATA_DIR/bank}
BANK_SOURCE=${VESSA_BANK_SOURCE:-$SYNTH_DIR}
RAY_PORT=${RAY_PORT:-6379}

ensure_data() { # $1: "bank" to build the bank as well as the dataset
  [ "${VESSA_INIT_DATA:-1}" = "1" ] || return 0
  mkdir -p "$DATA_DIR"
  exec 9>"$DATA_DIR/.vessa-init.lock"
  flock 9
  if [ "$BANK_SOURCE" = "$SYNTH_DIR" ] && [ ! -f "$SYNTH_DIR/dataset.json" ]; then
    log "no dataset at $SYNTH_DIR: generating the synthetic one"
    rm -rf "$SYNTH_DIR.partial"
    vessa data synth "$SYNTH_DIR.partial" --cases "${VESSA_SYNTH_CASES:-12}" --seed "${VESSA_SYNTH_SEED:-0}"
    rm -rf "$SYNTH_DIR" && mv "$SYNTH_DIR.partial" "$SYNTH_DIR"
  fi
  if [ "${1:-}" = "bank" ] && [ ! -f "$BANK_DIR/manifest.json" ]; then
    log "no bank at $BANK_DIR: building it from $BANK_SOURCE (first ${VESSA_BANK_LABELED:-2} patients)"
    rm -rf "$BANK_DIR.partial"
    local device_args=()
    [ -n "${VESSA_BANK_DEVICE:-}" ] && device_args=(--device "$VESSA_BANK_DEVICE")
    vessa bank build --data "$BANK_SOURCE" --labeled "${VESSA_BANK_LABELED:-2}" --out "$BANK_DIR.partial" \
      "${device_args[@]}"
    rm -rf "$BANK_DIR" && mv "$BANK_DIR.partial" "$BANK_DIR"
  fi
  flock -u 9
  exec 9>&-
}

# Extra `ray start` options, e.g. "--num-cpus 8 --object-store-memory 2000000000" or the fixed ports a
# host-network deployment needs (--ray-client-server-port, --dashboard-agent-listen-port, ...).
read -r -a RAY_ARGS <<<"${RAY_START_ARGS:-}"

role=${1:-assistant}
[ $# -gt 0 ] && shift

case "$role" in
  assistant)
    ensure_data bank
    # `--replicas auto` (the compose default): leave the Serve config's autoscaling_config in charge.
    serve_args=()
    while [ $# -gt 0 ]; do
      case "$1" in
        --replicas | --gpus-per-replica)
          if [ "${2:-auto}" != "auto" ] && [ -n "${2:-}" ]; then serve_args+=("$1" "$2"); fi
          shift 2
          ;;
        *) serve_args+=("$1"); shift ;;
      esac
    done
    ckpt=${ASSISTANT_CKPT:-}
    if [ -z "$ckpt" ]; then
      if [ -f /models/assistant.pt ]; then ckpt=/models/assistant.pt; else ckpt=pretrained; fi
    fi
    [ "$ckpt" = pretrained ] && log "no /models/assistant.pt: serving LiteMedSAM with untrained VESSA parts (ckpt=pretrained)"
    ray start --head --port="$RAY_PORT" --include-dashboard=false --disable-usage-stats "${RAY_ARGS[@]}"
    http_args=()
    [ -n "${VESSA_HTTP_PORT:-}" ] && http_args+=(--port "$VESSA_HTTP_PORT")
    [ -n "${VESSA_HTTP_HOST:-}" ] && http_args+=(--host "$VESSA_HTTP_HOST")
    vessa serve --address auto --stream --bank "$BANK_DIR" --ckpt "$ckpt" --run-dir /runs/serve \
      "${http_args[@]}" "${serve_args[@]}" &
    serve_pid=$!
    stop() {
      log "stopping"
      kill -TERM "$serve_pid" 2>/dev/null || true
    }
    trap stop TERM INT
    set +e
    wait "$serve_pid"
    rc=$?
    # `wait` returns early when the trap fires: wait again for vessa serve's own orderly shutdown.
    while kill -0 "$serve_pid" 2>/dev/null; do
      wait "$serve_pid"
      rc=$?
    done
    ray stop --force >/dev/null 2>&1 || true
    exit "$rc"
    ;;
  trainer)
    ensure_data
    read -r -a train_extra <<<"${TRAIN_ARGS:-}"
    exec vessa train "$@" "${train_extra[@]}"
    ;;
  worker)
    exec ray start --address="${RAY_HEAD_ADDRESS:-assistant:$RAY_PORT}" --block --disable-usage-stats "${RAY_ARGS[@]}" "$@"
    ;;
  dispatcher)
    # A Ray driver needs a Ray node on its machine: given a head address (KubeRay: vessa-head-svc:6379),
    # join the cluster as a node without resources (no replica lands here), then attach to it.
    address=${RAY_HEAD_ADDRESS:-auto}
    if [ "$address" != auto ] && [[ "$address" != ray://* ]]; then
      ray start --address="$address" --num-cpus=0 --num-gpus=0 --disable-usage-stats "${RAY_ARGS[@]}"
      address=auto
    fi
    exec vessa dispatcher --ray-address "$address" "$@"
    ;;
  redis)
    args=(--port "${REDIS_PORT:-6379}" --bind "${REDIS_BIND:-0.0.0.0}" --dir "${REDIS_DIR:-/redis}"
      --appendonly yes --appendfsync everysec --save "" --maxmemory-policy noeviction)
    [ -n "${REDIS_MAXMEMORY:-}" ] && args+=(--maxmemory "$REDIS_MAXMEMORY")
    if [ -n "${REDIS_PASSWORD:-}" ]; then
      args+=(--requirepass "$REDIS_PASSWORD")
    else
      # No password: only on a private network (compose's, a cluster's); protected mode would refuse
      # every client that is not on loopback.
      args+=(--protected-mode no)
    fi
    exec redis-server "${args[@]}" "$@"
    ;;
  init-data)
    ensure_data bank
    ;;
  *)
    exec "$role" "$@"
    ;;
esac
