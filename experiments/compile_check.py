"""Compiles a CTRL step for a TPU slice on this machine and prints per-chip memory and FLOPs.

    .venv-tpu/bin/python experiments/compile_check.py \
        --config=configs/pod.py:model=gemma_2b,topology=v5e:16x16

Needs libtpu (`make venv-tpu`); no TPU. Exit status 1 when the step leaves less than
config.min_headroom of the chip's HBM free, naming the largest buffers. All the work is in
infalign_jax.workflows.compile_check.
"""

import os
import sys
import tempfile

from ml_collections import config_flags

from infalign_jax.infra import aot, cli
from infalign_jax.workflows import compile_check

_CONFIG = config_flags.DEFINE_config_file("config", "configs/pod.py", "Pod config.")


def main(argv):
    cli.start(argv)
    config = _CONFIG.value
    with tempfile.TemporaryDirectory() as dump:
        # Before the first compile: XLA reads its flags once.
        os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                                         aot.dump_flags(dump, "rl_step")]))
        try:
            check = compile_check.run(config)
        except compile_check.DoesNotFit as e:
            print(f"error: does not fit, the TPU compiler refused the step: {e}", file=sys.stderr)
            sys.exit(1)
        print(compile_check.summary(check, float(config.mfu)), flush=True)
        if check.report.fits(float(config.min_headroom)):
            return
        print(f"error: does not fit: the step uses {100 * (1 - check.report.headroom):.1f}% of "
              f"a device's HBM, more than the {100 * (1 - float(config.min_headroom)):.1f}% "
              f"allowed (config.min_headroom={config.min_headroom}); largest buffers:",
              file=sys.stderr)
        for size, shapes in aot.largest_buffers(dump, "rl_step"):
            print(f"  {aot.gib(size)}: {shapes[:200]}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
