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
#   label     [vessa label options]   `vessa label` through the running service's Redis path: the dataset
#                                     mounted at $VESSA_LABEL_DATA (default /data/label-in) into
#                                     $VESSA_LABEL_OUT (default /runs/labels); with nothing mounted there,
#                                     the demo dataset (every case). Options from LABEL_ARGS are appended.
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
#
# A trained assistant before serving: with no ASSISTANT_CKPT and no $VESSA_MODELS_DIR/assistant.pt
# (default /models), `assistant` first trains Stage-1 on the bank (`vessa assistant train`, options from
# $VESSA_STAGE1_ARGS: the GPU default schedule, or the CPU override's short one), saves it on the models
# volume (under a lock, renamed into place when whole; an interrupted run resumes), then serves it; the
# healthcheck waits. Untrained VESSA parts are served only when asked for by name: ASSISTANT_CKPT=pretrained.
set -euo pipefail

log() { echo "[vessa-entrypoint] $*" >&2; }

DATA_DIR=${VESSA_DATA_DIR:-/data}
SYNTH_DIR=${VESSA_SYNTH_DIR:-$DATA_DIR/synth}
BANK_DIR=${VESSA_BANK_DIR:-$DATA_DIR/bank}
BANK_SOURCE=${VESSA_BANK_SOURCE:-$SYNTH_DIR}
RAY_PORT=${RAY_PORT:-6379}
MODELS_DIR=${VESSA_MODELS_DIR:-/models}

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

ensure_assistant() { # prints the checkpoint to serve; trains Stage-1 first when there is none
  if [ -n "${ASSISTANT_CKPT:-}" ]; then echo "$ASSISTANT_CKPT"; return 0; fi
  local final="$MODELS_DIR/assistant.pt" partial="$MODELS_DIR/.stage1.partial"
  if [ ! -f "$final" ]; then
    mkdir -p "$MODELS_DIR"
    exec 8>"$MODELS_DIR/.stage1.lock"
    flock 8
    if [ ! -f "$final" ]; then
      log "no $final: training Stage-1 on the bank $BANK_DIR first (VESSA_STAGE1_ARGS='${VESSA_STAGE1_ARGS:-}'); ASSISTANT_CKPT=pretrained would serve untrained parts"
      local stage1_args=()
      read -r -a stage1_args <<<"${VESSA_STAGE1_ARGS:-}"
      vessa assistant train --bank "$BANK_DIR" --out "$partial/assistant.pt" "${stage1_args[@]}" >&2
      [ -f "$partial/assistant.pt" ] || { log "Stage-1 wrote no $partial/assistant.pt"; exit 1; }
      mv "$partial/assistant.pt" "$final"
      rm -rf "$partial"
      log "Stage-1 done: $final"
    fi
    flock -u 8
    exec 8>&-
  fi
  echo "$final"
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
    ckpt=$(ensure_assistant)
    if [ "$ckpt" = pretrained ] || [ "$ckpt" = random ]; then
      log "ASSISTANT_CKPT=$ckpt: serving LiteMedSAM with untrained VESSA parts, as asked"
    fi
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
  label)
    label_in=${VESSA_LABEL_DATA:-$DATA_DIR/label-in}
    label_out=${VESSA_LABEL_OUT:-/runs/labels}
    read -r -a label_extra <<<"${LABEL_ARGS:-}"
    if [ -d "$label_in" ] && [ -n "$(ls -A "$label_in" 2>/dev/null)" ]; then
      exec vessa label --data "$label_in" --out "$label_out" "$@" "${label_extra[@]}"
    fi
    ensure_data
    log "nothing mounted at $label_in: labeling the demo dataset $SYNTH_DIR (every case) into $label_out"
    exec vessa label --data "$SYNTH_DIR" --out "$label_out" --all "$@" "${label_extra[@]}"
    ;;
  *)
    exec "$role" "$@"
    ;;
esac
