"""Compiles a CTRL step for a TPU slice on this machine and prints per-chip memory and FLOPs.

    .venv-tpu/bin/python experiments/compile_check.py \
        --config=configs/pod.py:model=gemma_2b,topology=v5e:16x16

Needs libtpu (`make venv-tpu`); no TPU. `--config.check.programs=rl,calibration,reward` and
`--config.check.layouts=train,serve` pick what is compiled (configs/pod.py). Exit status 1 when
a program leaves less than config.min_headroom of the chip's HBM free, naming its largest
buffers. All the work is in
infalign_jax.workflows.compile_check.
"""

import os
import sys
import tempfile

from infalign_jax.infra import aot, cli
from infalign_jax.workflows import compile_check

_CONFIG = cli.define_config("config", "configs/pod.py", "Pod config.")


def main(argv):
    cli.start(argv)
    config = _CONFIG.value
    mfu, min_headroom = float(config.mfu), float(config.min_headroom)
    failed = []
    with tempfile.TemporaryDirectory() as dump:
        # Before the first compile: XLA reads its flags once.
        modules = "(" + "|".join(compile_check.MODULES.values()) + ")"
        os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                                         aot.dump_flags(dump, modules)]))
        for program, layout in compile_check.plan(config):
            name = program if program == "reward" else f"{program} (rollout layout {layout})"
            try:
                check = compile_check.check_one(config, program, layout)
            except compile_check.DoesNotFit as e:
                print(f"error: {name} does not fit, the TPU compiler refused it: {e}",
                      file=sys.stderr, flush=True)
                failed.append(name)
                continue
            print(compile_check.summary(check, mfu) + "\n", flush=True)
            if check.report.fits(min_headroom):
                continue
            failed.append(name)
            print(f"error: {name} does not fit: it uses {100 * (1 - check.report.headroom):.1f}% "
                  f"of a device's HBM, more than the {100 * (1 - min_headroom):.1f}% allowed "
                  f"(config.min_headroom={min_headroom}); largest buffers:", file=sys.stderr)
            for size, shapes in aot.largest_buffers(dump, check.module):
                print(f"  {aot.gib(size)}: {shapes[:200]}", file=sys.stderr)
            sys.stderr.flush()
    if failed:
        print(f"error: does not fit: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
