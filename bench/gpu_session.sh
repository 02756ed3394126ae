#!/usr/bin/env bash
# Issues 18 and 19 on one NVIDIA GPU machine with no registry access, in four calls of the
# device tool, each within the 30 s the machine stays warm (what travels: see bench/gpu_run.sh
# and bench/gpu_speculative.sh for how .gpu/ is made):
#   bash bench/gpu_session.sh stash    # carry .gpu/mlxcuda.part.aa .gpu/gguf.a
#   bash bench/gpu_session.sh stash-b  # carry .gpu/gguf.b
#   bash bench/gpu_session.sh scale    # carry .gpu/mlxcuda.part.ab .gpu/mlx-*.whl
#                                      #   .gpu/mlx_lm-*.whl .gpu/deps .gpu/model-tok
#   bash bench/gpu_session.sh beyond   # carry .gpu/gguf.c
# scale: installs, builds random 4-bit llamas of the 8B, 1B and 135M shapes with the real
#   tokenizer (BUILD), prints the dense-matmul calibration (engine/qmatmul.py) of each, runs one
#   1B stream through the server with --speculative off and auto (SINGLE_VARIANTS: auto stalled
#   on cuDNN's per-shape attention graphs before engine/attention.py), then bench.load (ours vs
#   raw mlx-lm's BatchGenerator) on SHAPES. STEPS picks among calibrate, modes, single, load.
# beyond: the default model (SmolLM2-135M GGUF) for prompt-lookup speculative decoding
#   (bench/speculative.py), the 8B shape with an early-exit draft model, the quantized KV
#   cache at 2K and 16K context, the prompt cache on disk with an 8K prefix (1B shape).
# PHASES (space-separated) picks steps of a call; every step gets at most what is left of
# LIMIT seconds (default 570). Results land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
STASH=${STASH:-$HOME/stash}
SP=${SP:-/opt/torch/.venv/lib/python3.12/site-packages}
mkdir -p "$OUT" "$STASH"
start=$(date +%s)
limit=${LIMIT:-570}
left() { echo $((limit - ($(date +%s) - start))); }
# step NAME SECONDS CMD...: run CMD for at most SECONDS (or what is left), output in NAME.txt.
step() {
  local name=$1 want=$2
  shift 2
  local have
  have=$(($(left) - 10))
  [ "$have" -lt "$want" ] && want=$have
  if [ "$want" -lt 20 ]; then echo "skip $name: no time left" | tee -a "$OUT/session.txt"; return; fi
  echo "== $name (at most ${want}s, at $(($(date +%s) - start))s)" | tee -a "$OUT/session.txt"
  timeout -s INT "$want" "$@" > "$OUT/$name.txt" 2>&1
  echo "   exit $? after $(($(date +%s) - start))s" | tee -a "$OUT/session.txt"
  tail -n 40 "$OUT/$name.txt"
}

env_setup() {
  export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  LD_LIBRARY_PATH=$(ls -d "$SP"/nvidia/*/lib | tr '\n' ':')
  export LD_LIBRARY_PATH
}

case "${1:-}" in
  stash) cp .gpu/mlxcuda.part.aa .gpu/gguf.a "$STASH"/ && ls -la "$STASH"; exit $? ;;
  stash-b) cp .gpu/gguf.b "$STASH"/ && ls -la "$STASH"; exit $? ;;
  scale)
    [ -n "${SKIP_INSTALL:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      .gpu/mlx-*.whl .gpu/mlx_lm-*.whl .gpu/deps/*.whl || exit 4
    [ -n "${SKIP_INSTALL:-}" ] || { cat "$STASH/mlxcuda.part.aa" .gpu/mlxcuda.part.ab | tar xJ -C /tmp/site || exit 5; }
    [ -d .gpu/model-tok ] && cp -r .gpu/model-tok "$STASH/"
    env_setup
    echo "installed at $(($(date +%s) - start))s"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    for shape in ${BUILD:-8b 1b 135m}; do
      [ -d "/tmp/model-$shape" ] || python3 -m bench.gpu_model "/tmp/model-$shape" --tokenizer "$STASH/model-tok" --shape "$shape" \
        | tee -a "$OUT/gpu.txt"
    done
    calibrate='
import logging, sys, time
logging.basicConfig(level=logging.INFO, format="%(message)s")
from mlx_server.engine.model import load
for path in sys.argv[1:]:
    t = time.time()
    loaded = load(path)
    print(path, "->", loaded.device_note, f"({time.time() - t:.1f} s)", flush=True)
'
    for what in ${STEPS:-calibrate single load}; do
      case $what in
        calibrate)
          # shellcheck disable=SC2046
          step calibrate 200 python3 -c "$calibrate" $(for m in ${BUILD:-8b 1b 135m}; do echo /tmp/model-$m; done) ;;
        modes)  # in process: speculative off/auto x dense off/on, 1 and 32 streams
          step modes "${BMODES:-240}" python3 -m bench.decode_modes /tmp/model-1b /tmp/model-8b \
            --tokens 128 --streams 32 --repeats 2 --json "$OUT/modes.jsonl" ;;
        single)  # through the server: one stream, each of SINGLE_VARIANTS (;-separated flags)
          IFS=';' read -r -a variants <<< "${SINGLE_VARIANTS:---speculative off;--speculative auto}"
          i=0
          for v in "${variants[@]}"; do
            i=$((i + 1))
            step "single-$i" 100 python3 -m bench.load --model /tmp/model-1b --systems ours \
              --tokens 128 --workloads single --repeats 3 --timeout 60 \
              "--ours-args=--log-level=debug $v" --log-dir "/tmp/gpu-logs/single-$i"
          done ;;
        load)
          for shape in ${SHAPES:-8b 1b 135m}; do
            if [ "$shape" = 8b ]; then
              w=single,concurrent,long,prefix extra="--long-tokens 2000 --prefix-tokens 2000" b=${B8:-230}
            else
              w=single,concurrent extra="" b=${BSMALL:-110}
            fi
            # shellcheck disable=SC2086
            step "load-$shape" "$b" python3 -m bench.load --model "/tmp/model-$shape" \
              --systems ours,raw_shipped --tokens "${TOKENS:-128}" --streams "${STREAMS:-32,64}" \
              --mix uniform --workloads "$w" --repeats "${REPEATS:-2}" --timeout 100 \
              --warm-concurrent $extra "--ours-args=--log-level=debug ${OURS_ARGS:-}" \
              --json "$OUT/load-$shape.json" --log-dir "/tmp/gpu-logs/$shape"
          done ;;
      esac
    done
    [ -d /tmp/gpu-logs ] && tar czf "$OUT/logs-scale.tar.gz" -C /tmp gpu-logs
    ;;
  beyond)
    env_setup
    cat "$STASH/gguf.a" "$STASH/gguf.b" .gpu/gguf.c > /tmp/smol.gguf || exit 6
    for phase in ${PHASES:-speculative draft kv disk}; do
      case $phase in
        speculative)
          step speculative 200 python3 -m bench.speculative --model /tmp/smol.gguf --lines 300 \
            --tokens "${SPEC_TOKENS:-256}" --streams 8 --repeats 3 --json "$OUT/speculative.jsonl" ;;
        draft)
          step draft 150 python3 -m bench.speculative --model /tmp/model-8b --workloads chat \
            --tokens 128 --streams 8 --repeats 2 --draft-layers 2 --damp-deep 0.05 \
            --json "$OUT/draft.jsonl" ;;
        kv)
          step kv 150 python3 -m bench.kv_quant --model /tmp/smol.gguf --contexts 2048,16384 \
            --budget 8G --json "$OUT/kv.jsonl" ;;
        disk)
          step disk 100 python3 -m bench.disk_cache --model /tmp/model-1b --tokens 8192 \
            --json "$OUT/disk.jsonl" ;;
      esac
    done
    ;;
  *) echo "usage: $0 stash|stash-b|scale|beyond"; exit 2 ;;
esac
echo "done at $(($(date +%s) - start))s"
