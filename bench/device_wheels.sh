#!/usr/bin/env bash
# Fetches, on this machine, the wheels the device tool's GPU machine lacks for the benchmarks
# (its image has jax[cuda], flax, optax, orbax, chex, transformers and torch; no network there)
# into .whl/ (ignored by git through .git/info/exclude), for `bench/device_run.sh` to install there:
#   bash bench/device_wheels.sh    then run: bash bench/device_run.sh   with carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
PIP=${PIP:-python3 -m pip}
# the versions this project's CPU environment runs; the GPU machine's Python is 3.12
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
    grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml-collections==1.1.0 gguf==0.19.0 \
    vaderSentiment==3.3.2
ls -l .whl
du -sh .whl
