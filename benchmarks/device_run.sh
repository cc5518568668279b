#!/usr/bin/env bash
# Every figure of the GPU performance issue in one command: the assistant alone (cold/warm by batch,
# linear scaling), the service paths side by side (in-process, DeploymentHandle, REST 1 slice and
# 16-slice volume, @serve.batch gain, Redis path), and the student trainer's iteration rate in BCP and
# in VESSA mode with a real assistant sharing the card. Prints one table; JSON under $OUT.
#
#   bash benchmarks/device_run.sh            # full sizes (one H200: about 6-7 minutes)
#   bash benchmarks/device_run.sh --small    # smallest form (CPU, CI): a couple of minutes
#
# On the device machine (Python 3.12, no registry): carry the "serve" set of benchmarks/gpu/pack.sh
# (.device/ Ray Serve + Redis bundle, .whl/ wheels) after the "models" set (docs/gpu.md); the GPU queue's
# `perf` item runs this script (`bash benchmarks/gpu/run.sh perf`).
set -euo pipefail
cd "$(dirname "$0")/.."
SMALL=0
[ "${1:-}" = "--small" ] && SMALL=1
OUT=${OUT:-runs/device_run}
mkdir -p "$OUT"
# what travelled (.device/, .whl/, .gpu-models/) is unpacked into .gpu-site/; sets PY and PYTHONPATH
source benchmarks/gpu/env.sh
if [ "$SMALL" = 1 ]; then
  # the smallest form: the same code paths, the tiny stand-in encoder, a handful of requests. Sizes are
  # the least that still runs every path and yields every figure (it runs in the test suite, on CPU):
  # - model: one batch size (cold, warm and the encoder/decoder split are all timed on it) and two
  #   request sizes (a spread needs two; 2 already takes the batched path). Each predict costs seconds
  #   on CPU (the decoder), and a batch size costs 6 predicts, a request size 3.
  # - serving: 2 requests per path, concurrency 2 (so requests still overlap), one 2-slice volume.
  # - trainer: one timed step after one warm-up step per method (a rate needs one), batch 4 (2 labeled +
  #   2 unlabeled, BCP's halves); 6 cases is the fewest synthetic cases that leave unlabeled and val data.
  MODEL=(--batches 1 --scaling 1,2 --reps 1 --encoder tiny --levers 2)
  SERVE=(--requests 2 --concurrency 2 --volume-slices 2 --max-batch 16 --encoder tiny --ray-cpus 2)
  TRAIN=(--iters 1 --warmup 1 --image-size 64 --batch-size 4 --cases 6 --assistant-encoder tiny)
else
  MODEL=(--batches 1,32,256 --scaling 1,8,64,512 --reps 3 --levers 256)
  SERVE=(--requests 512 --concurrency 64 --slices-per-request 16 --max-batch 512 --dispatchers 2)
  TRAIN=(--iters 100 --warmup 20 --image-size 256 --batch-size 24)
fi
$PY -m benchmarks.model_bench "${MODEL[@]}" --json "$OUT/model.json"
$PY -m benchmarks.serving --mode both "${SERVE[@]}" --json "$OUT/serving.json"
$PY -m student_trainer.benchmark --methods bcp,bcp_vessa --assistant inprocess "${TRAIN[@]}" --json "$OUT/trainer.json"
$PY -m benchmarks.summarise "$OUT"
