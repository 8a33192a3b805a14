#!/usr/bin/env bash
# One GPU-machine session: install the carried wheels, show the GPU, run the end-to-end benchmark
# (scripts/bench_gpu_e2e.py) at each size in turn, writing logs and JSON to $OUT.
#
#   bash scripts/gpu_session.sh [N ...]        # default sizes: 100000 1000000
#
# Run from the repository root with .whl/ present (see docs/gpu.md).  Re-running on the same
# machine resumes: shards, bare kernels and finished stages are kept under $WORKDIR/<N>, and an
# interrupted stage goes on from its last chunk or epoch.
#
# Environment (defaults):
#   OUT=/tmp/spbench-out   where logs and JSON go
#   WORKDIR=/tmp/spbench   shards + workspaces, one folder per size
#   BUDGET=570             seconds for the whole script; each size stops (SIGINT, table still
#                          written) when its share runs out: LIMIT_<N> or whatever is left
#   EPOCHS=30              training epochs up to N=100000; EPOCHS_LARGE=10 above
#   FULL_MAX_N=100000      run `score --full` (the speedup's reference) only up to this N
#   BENCH_ARGS=""          extra arguments for every run (e.g. "--skip-bare" or "--stages embed")
#   BENCH_ARGS_<N>=""      extra arguments for size N only (e.g. BENCH_ARGS_1000000="--profile-steps 50",
#                          so that the other size's training is timed without the profiler)
#   GPU_TESTS=1            first run tests/test_gpu_paths.py (its CUDA tests run only there; ~1 min),
#                          so a broken CUDA path shows before the benchmark spends the lease
#   DECODE_BENCH=1         after N=100000, scripts/bench_decode.py on its shards (~30 s): the product's
#                          read + decode path, in-process and as dask tasks, against bare PNG decoding
#   REUSE_BARE=1           later sizes take the size-independent bare figures (train, forward, decode)
#                          from the first size's run instead of measuring them again (kNN and GCN,
#                          which depend on N, are always measured per size)
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
OUT=${OUT:-/tmp/spbench-out}
WORKDIR=${WORKDIR:-/tmp/spbench}
BUDGET=${BUDGET:-570}
EPOCHS=${EPOCHS:-30}
EPOCHS_LARGE=${EPOCHS_LARGE:-10}
FULL_MAX_N=${FULL_MAX_N:-100000}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT" "$WORKDIR"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}  # on the device machines the plain python3 is the one with CUDA torch

# 1. wheels -> $SITE (skipped when the same wheels are already there)
stamp="$SITE/.wheels-$(ls .whl/*.whl 2>/dev/null | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no .whl/*.whl here: pass carry=['.whl'] (see docs/gpu.md)"
  elif ! $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
    echo "pip install failed; unpacking the wheels instead"
    mkdir -p "$SITE"
    for w in .whl/*.whl; do $PY -m zipfile -e "$w" "$SITE"; done
  fi
  touch "$stamp"
fi
export PYTHONPATH=$SITE:$PWD

# 2. the machine
{ nvidia-smi; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv; nproc; free -g; df -h /tmp; } \
  > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
$PY - <<'EOF' 2>&1 | tee -a "$OUT/machine.txt"
import importlib
for name in ("torch", "torchvision", "torch_geometric", "numpy", "scipy", "sklearn", "PIL", "pandas", "pyarrow",
             "faiss", "zarr", "numcodecs", "dask", "distributed", "fsspec", "braceexpand", "tqdm", "click",
             "webdataset", "psutil", "yaml", "streamprune.pipeline"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:<22} {getattr(mod, '__version__', 'ok')}")
    except Exception as exc:  # report and go on: the benchmark says which section needs it
        print(f"{name:<22} MISSING: {type(exc).__name__}: {exc}")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF

# 3. the CUDA tests (CI has no GPU)
if [ "${GPU_TESTS:-1}" = 1 ]; then
  timeout 240 $PY -m pytest -q -x -p no:cacheprovider tests/test_gpu_paths.py > "$OUT/gpu-tests.log" 2>&1
  echo "== tests/test_gpu_paths.py: exit $? after $(( $(date +%s) - T0 ))s"; tail -5 "$OUT/gpu-tests.log"
fi

# 4. the benchmark, size by size
SIZES=("$@")
[ ${#SIZES[@]} -eq 0 ] && SIZES=(100000 1000000)
for n in "${SIZES[@]}"; do
  left=$(( BUDGET - ($(date +%s) - T0) ))
  var="LIMIT_$n"
  limit=${!var:-$left}
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 30 ]; then
    echo "== N=$n: skipped, ${left}s left of BUDGET=${BUDGET}s"
    continue
  fi
  epochs=$EPOCHS
  [ "$n" -gt 100000 ] && epochs=$EPOCHS_LARGE
  full=--full
  [ "$n" -gt "$FULL_MAX_N" ] && full=--no-full
  if [ "${REUSE_BARE:-1}" = 1 ] && [ -n "${FIRST_BARE:-}" ] && [ ! -f "$WORKDIR/$n/bare-$n.json" ]; then
    mkdir -p "$WORKDIR/$n"
    $PY -c "import json,sys; b=json.load(open(sys.argv[1])); json.dump({k: v for k, v in b.items() if k in ('train', 'train_b128', 'forward', 'decode')} | {'reused_from': sys.argv[1]}, open(sys.argv[2], 'w'), indent=1)" \
      "$FIRST_BARE" "$WORKDIR/$n/bare-$n.json" && echo "== N=$n: train/forward/decode bare figures from $FIRST_BARE"
  fi
  echo "== N=$n: epochs $epochs, $full, limit ${limit}s"
  # SIGINT at the limit: the benchmark stops the running stage, prints the table and writes the JSON.
  extra="BENCH_ARGS_$n"
  timeout -s INT -k 60 "$limit" $PY scripts/bench_gpu_e2e.py --n "$n" --epochs "$epochs" $full \
    --workdir "$WORKDIR/$n" --out "$OUT/bench-$n.json" ${BENCH_ARGS:-} ${!extra:-} 2>&1 | tee "$OUT/bench-$n.log"
  echo "== N=$n: exit ${PIPESTATUS[0]} after $(( $(date +%s) - T0 ))s in all"
  if [ "$n" = 100000 ] && [ "${DECODE_BENCH:-1}" = 1 ]; then
    timeout -k 10 120 $PY scripts/bench_decode.py --n "$n" --workdir "$WORKDIR/$n" --out "$OUT/decode-$n.json" \
      2>&1 | grep -v "distributed\." | tee "$OUT/decode-$n.log"
    echo "== decode benchmark: exit ${PIPESTATUS[0]} after $(( $(date +%s) - T0 ))s in all"
  fi
  [ -z "${FIRST_BARE:-}" ] && [ -f "$WORKDIR/$n/bare-$n.json" ] && FIRST_BARE="$WORKDIR/$n/bare-$n.json"
done
