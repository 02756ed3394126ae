#!/usr/bin/env bash
# The load benchmark on an NVIDIA GPU machine with no registry access (see README, "GPU (H100)"):
# installs the carried wheels into /tmp/site (MLX's CUDA library from its two split parts, using
# the PyTorch venv's CUDA 13 libraries), builds random 4-bit llamas of real shapes with the real
# tokenizer, and runs bench.load on them: ours vs mlx_lm.server vs raw mlx-lm.
#
# Needs, under .gpu/ (ignored by git), made here beforehand:
#   bash /work/shared/prepare-gpu-wheels.sh   # mlx, mlx_lm wheels; mlxcuda.part.aa/.ab
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_31_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform any -d .gpu/deps trio==0.35.0 outcome==1.3.0.post0 sniffio==1.3.1 \
#     quart==0.22.0 quart-trio==0.12.0 hypercorn==0.18.0 h2==4.4.1 hpack==4.2.0 \
#     hyperframe==6.1.0 priority==2.0.0 wsproto==1.3.2 flask==3.1.3 blinker==1.9.0 \
#     itsdangerous==2.2.0 werkzeug==3.1.9 llguidance==1.9.1
#   uv run python -m bench.gpu_model --export-tokenizer .gpu/model-tok
# (the GPU image has the rest: numpy, transformers, tokenizers, httpx, jinja2, attrs, ...).
# Then two calls of the device tool, the second within the 30 s the machine stays warm:
#   bash bench/gpu_run.sh stash            # carry .gpu/mlxcuda.part.aa: kept in $STASH
#   bash bench/gpu_run.sh run [SHAPES...]  # carry .gpu/mlxcuda.part.ab, .gpu/mlx-*.whl,
#                                          # .gpu/mlx_lm-*.whl, .gpu/deps, .gpu/model-tok;
#                                          # install, build, bench (default shapes: 135m 1b)
# Environment: SYSTEM_SETS, WORKLOADS, TOKENS, STREAMS, REPEATS, EXTRA, BUDGET_135M, BUDGET_1B,
# IDLE_CHECK (see below). Results land in $OUT (bench-SHAPE.txt/.json, gpu.txt, logs.tar.gz).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
STASH=${STASH:-$HOME/stash}
PY=${PY:-python3}
SP=${SP:-/opt/torch/.venv/lib/python3.12/site-packages}
mkdir -p "$OUT" "$STASH"
cmd=${1:-run}
shift || true

if [ "$cmd" = stash ]; then
  cp .gpu/mlxcuda.part.aa "$STASH"/ && ls -la "$STASH"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c 'import sys; print(sys.version)'
  $PY -m pip list 2>/dev/null | grep -i -E '^(transformers|huggingface.hub|tokenizers|numpy|jinja2|werkzeug|click|attrs|httpx|h11|aiofiles|prometheus.client|pyyaml|protobuf|sentencepiece|safetensors) '
  ls /usr/lib/x86_64-linux-gnu/libopenblas* 2>/dev/null || echo 'no system OpenBLAS'
  exit 0
fi

[ "$cmd" = run ] || { echo "usage: $0 stash|run [SHAPES...]"; exit 2; }
shapes=("$@")
[ ${#shapes[@]} -gt 0 ] || shapes=(135m 1b)

if [ -z "${SKIP_INSTALL:-}" ]; then
  aa=.gpu/mlxcuda.part.aa
  [ -f "$aa" ] || aa="$STASH/mlxcuda.part.aa"
  [ -f "$aa" ] || { echo "mlxcuda.part.aa missing (machine went cold?)"; exit 3; }
  t0=$(date +%s)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .gpu/mlx-*.whl .gpu/mlx_lm-*.whl .gpu/deps/*.whl || exit 4
  cat "$aa" .gpu/mlxcuda.part.ab | tar xJ -C /tmp/site || exit 5
  export PYTHONPATH=/tmp/site:$PWD
  LD_LIBRARY_PATH=$(ls -d "$SP"/nvidia/*/lib | tr '\n' ':')
  export LD_LIBRARY_PATH
  echo "installed in $(($(date +%s) - t0))s"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv \
  | tee "$OUT/gpu.txt"
$PY -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device(),
  "cuda:", mx.cuda.is_available())' 2>&1 | tee -a "$OUT/gpu.txt" || exit 6

# Seconds each shape's benchmark may take (the whole call has 600).
budget_135m=${BUDGET_135M:-320}
budget_1b=${BUDGET_1B:-200}
# SYSTEM_SETS: space-separated runs per shape, each a --systems list (all share one GPU; every
# system of a run stays up, idle, while the others are measured).
read -r -a sets <<< "${SYSTEM_SETS:-ours,mlx_lm_server,raw_shipped}"
for shape in "${shapes[@]}"; do
  model=/tmp/model-$shape
  $PY -m bench.gpu_model "$model" --tokenizer .gpu/model-tok --shape "$shape" || continue
  if [ "$shape" = 135m ]; then
    workloads=${WORKLOADS:-single,concurrent,long,prefix} budget=$budget_135m
  else
    workloads=${WORKLOADS:-single,concurrent} budget=$budget_1b
  fi
  i=0
  for systems in "${sets[@]}"; do
    i=$((i + 1))
    name=$shape
    [ ${#sets[@]} -gt 1 ] && name=$shape-$i
    timeout -s INT "$budget" $PY -m bench.load --model "$model" \
      --systems "$systems" --tokens "${TOKENS:-256}" \
      --streams "${STREAMS:-8,32}" --mix uniform --workloads "$workloads" \
      --repeats "${REPEATS:-3}" --timeout 120 --warm-concurrent ${EXTRA:-} \
      --json "$OUT/bench-$name.json" --log-dir "/tmp/gpu-logs/$name" 2>&1 \
      | tee "$OUT/bench-$name.txt"
  done
done
if [ -n "${IDLE_CHECK:-}" ]; then  # what our server costs while it waits (CPU seconds, GPU load)
  $PY -m mlx_server --model "/tmp/model-${shapes[0]}" --port 18123 > /tmp/idle.log 2>&1 &
  pid=$!
  IDLE_PID=$pid $PY - <<'PY' 2>&1 | tee "$OUT/idle.txt"
import os, subprocess, time, httpx
for _ in range(600):
    try:
        if httpx.get("http://127.0.0.1:18123/health", timeout=1).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    time.sleep(0.5)
body = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
print("one request:", httpx.post("http://127.0.0.1:18123/v1/chat/completions", json=body,
      timeout=300).status_code)
time.sleep(2)
pid = int(os.environ["IDLE_PID"])
def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / 100
c0, t0 = cpu(), time.time()
time.sleep(10)
c1, t1 = cpu(), time.time()
print(f"our idle server: {c1 - c0:.2f} CPU s in {t1 - t0:.1f} s ({100 * (c1 - c0) / (t1 - t0):.0f}% of a core)")
print(subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,clocks.sm", "--format=csv"],
      capture_output=True, text=True).stdout)
PY
  kill "$pid"
fi
# At most 8 files come back from the machine: the systems' logs travel as one archive.
[ -d /tmp/gpu-logs ] && tar czf "$OUT/logs.tar.gz" -C /tmp gpu-logs
du -sh /tmp/* ~/.cache/* ~/.nv/* 2>/dev/null | sort -h | tail -8  # where the compiled kernels went
