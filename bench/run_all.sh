#!/usr/bin/env bash
# Runs every benchmark and writes the JSON results to ${OUT:-bench_out}/ — unchanged on CPU and
# GPU (on a GPU install the matching jax first, e.g. pip install -U "jax[cuda12]"). The printed
# tables name the hardware; record them in docs/benchmarks.md with the date and the device.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
"$PY" -c "import jax; print('devices:', jax.devices())"
"$PY" bench/run_benchmarks.py ${QUICK:+--quick} --out "$OUT/run_benchmarks.json"
"$PY" bench/rl_iteration.py ${QUICK:+--quick} --out "$OUT/rl_iteration.json"
"$PY" bench/real_model.py ${QUICK:+--quick} --out "$OUT/real_model.json"
"$PY" bench/real_rl_step.py --out "$OUT/real_rl_step.json"
"$PY" bench/real_rl_step.py --shared_prompt --out "$OUT/real_rl_step_shared_prompt.json"
"$PY" bench/decode_layout.py --profile --out "$OUT/decode_layout.json"
"$PY" bench/scaling_plan.py > "$OUT/scaling_plan.md"
echo "results in $OUT/"
