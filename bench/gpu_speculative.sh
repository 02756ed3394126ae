#!/usr/bin/env bash
# bench/speculative.py on an NVIDIA GPU machine with no registry access, on the real default
# model (SmolLM2-135M-Instruct Q4_1 GGUF, 94 MiB: too big to travel in one call beside MLX's
# CUDA library, so it travels in three parts). Made here beforehand, under .gpu/ (ignored):
#   bash /work/shared/prepare-gpu-wheels.sh     # mlx, mlx_lm wheels; mlxcuda.part.aa/.ab
#   (the deps of bench/gpu_run.sh in .gpu/deps)
#   G=<the bundled .gguf>; head -c $((22<<20)) $G > .gpu/gguf.a
#   tail -c +$(((22<<20)+1)) $G | head -c $((61<<20)) > .gpu/gguf.b
#   tail -c +$(((83<<20)+1)) $G > .gpu/gguf.c
# Then three calls of the device tool, each within the 30 s the machine stays warm:
#   bash bench/gpu_speculative.sh stash-a   # carry .gpu/mlxcuda.part.aa .gpu/gguf.a
#   bash bench/gpu_speculative.sh stash-b   # carry .gpu/gguf.b
#   bash bench/gpu_speculative.sh run       # carry .gpu/mlxcuda.part.ab .gpu/mlx-*.whl
#                                           #   .gpu/mlx_lm-*.whl .gpu/deps .gpu/gguf.c
# ARGS overrides the benchmark's arguments. Results land in $OUT (spec.txt, spec.jsonl).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
STASH=${STASH:-$HOME/stash}
SP=${SP:-/opt/torch/.venv/lib/python3.12/site-packages}
mkdir -p "$OUT" "$STASH"
case "${1:-run}" in
  stash-a) cp .gpu/mlxcuda.part.aa .gpu/gguf.a "$STASH"/ && ls -la "$STASH"; exit $? ;;
  stash-b) cp .gpu/gguf.b "$STASH"/ && ls -la "$STASH"; exit $? ;;
  run) ;;
  *) echo "usage: $0 stash-a|stash-b|run"; exit 2 ;;
esac
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  .gpu/mlx-*.whl .gpu/mlx_lm-*.whl .gpu/deps/*.whl || exit 4
cat "$STASH/mlxcuda.part.aa" .gpu/mlxcuda.part.ab | tar xJ -C /tmp/site || exit 5
cat "$STASH/gguf.a" "$STASH/gguf.b" .gpu/gguf.c > /tmp/smol.gguf || exit 6
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LD_LIBRARY_PATH=$(ls -d "$SP"/nvidia/*/lib | tr '\n' ':'); export LD_LIBRARY_PATH
echo "installed in $(($(date +%s) - t0))s"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/spec.txt"
# shellcheck disable=SC2086
timeout "${LIMIT:-480}" python3 -m bench.speculative --model /tmp/smol.gguf \
  ${ARGS:---lines 300 --tokens 256 --streams 8} --json "$OUT/spec.jsonl" 2>&1 | tee -a "$OUT/spec.txt"
echo "exit ${PIPESTATUS[0]} after $(($(date +%s) - t0))s"
