#!/usr/bin/env bash
# The load benchmark on an NVIDIA GPU machine with no registry access (see README, "GPU (H100)"):
# installs the carried wheels into /tmp/site (MLX's CUDA library from its two split parts, using
# the PyTorch venv's CUDA 13 libraries), builds random 4-bit llamas of real shapes with the real
# tokenizer, and runs bench.load on them: ours vs mlx_lm.server vs raw mlx-lm.
#
# Needs, under .gpu/ (made by /work/shared/prepare-gpu-wheels.sh and README's steps): the mlx and
# mlx_lm wheels, deps/*.whl, model-tok/ (tokenizer.json, tokenizer_config.json), and the parts
# mlxcuda.part.aa (here or in $STASH, left there by an earlier call) and mlxcuda.part.ab.
#
#   bash bench/gpu_run.sh stash            # call 1: keep .gpu/mlxcuda.part.aa in $STASH
#   bash bench/gpu_run.sh run [SHAPES...]  # call 2: install, build, bench (default: 135m 1b)
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
budget_135m=${BUDGET_135M:-300}
budget_1b=${BUDGET_1B:-200}
for shape in "${shapes[@]}"; do
  model=/tmp/model-$shape
  $PY -m bench.gpu_model "$model" --tokenizer .gpu/model-tok --shape "$shape" || continue
  if [ "$shape" = 135m ]; then
    workloads=single,concurrent,multiturn,long,prefix budget=$budget_135m
  else
    workloads=single,concurrent budget=$budget_1b
  fi
  timeout -s INT "$budget" $PY -m bench.load --model "$model" \
    --systems ours,mlx_lm_server,raw_shipped --tokens "${TOKENS:-256}" \
    --streams "${STREAMS:-8,32}" --mix uniform --workloads "$workloads" \
    --repeats "${REPEATS:-3}" --timeout 120 ${EXTRA:-} \
    --json "$OUT/bench-$shape.json" --log-dir "/tmp/gpu-logs/$shape" 2>&1 | tee "$OUT/bench-$shape.txt"
done
# At most 8 files come back from the machine: the systems' logs travel as one archive.
[ -d /tmp/gpu-logs ] && tar czf "$OUT/logs.tar.gz" -C /tmp gpu-logs
