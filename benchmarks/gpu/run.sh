#!/usr/bin/env bash
# The GPU queue's one entry point (docs/gpu.md: checklist, carry sets, ledger).
#
#   bash benchmarks/gpu/run.sh list                      # the items, in queue order
#   bash benchmarks/gpu/run.sh install                   # only unpack what travelled (a staging call)
#   bash benchmarks/gpu/run.sh ITEM [--small] [--out DIR] [--data DIR] [--test DIR] [--device D]
#
# Each ITEM is one self-contained command of at most 9 minutes on one H200: it prints one table and
# writes result.json (and its logs) under --out (default runs/gpu/ITEM). --small runs the same commands
# on the CPU at tiny sizes (tests/e2e/test_gpu_queue.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benchmarks/gpu/env.sh
source benchmarks/gpu/env.sh
item=${1:?usage: run.sh list | install | ITEM [--small] [--out DIR] [--data DIR] [--test DIR]}
shift
if [ "$item" = install ]; then
  "$PY" -c "import pydantic, nibabel, torch; print('importable: pydantic', pydantic.VERSION, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"
  exit 0
fi
exec "$PY" -m benchmarks.gpu.queue "$item" "$@"
