"""The reference table of a real task alone (InfAlign Algorithm 1, step 1), resumable.

Command:
    .venv/bin/python experiments/calibrate.py \
        --config=configs/calibrate_real.py:task=helpfulness,size=tiny \
        --workdir=runs/ctrl_real_help_tiny
Writes `<workdir>/reference_table.npz` (the file `experiments/train_policy.py` with
`configs/ctrl_real.py` and the same task/size then reuses; it checks the judge and base-model ids)
and `<workdir>/calibration/manifest.json`. Killed midway, the same command continues from
`<workdir>/reference_table.partial.npz`.
Expected runtime on this CPU: tiny (4 prompts x K=16 x 12 tokens) under 1 min, measured here
(model load ~10 s; the pass 13 s on a quiet machine, 25-53 s at load ~10, mostly compiling).
Measured sampling rate, 64 rows a call, 12 new tokens: 17.4 samples/s (209 new tokens/s) on a
quiet machine, ~5 samples/s at load ~10. small (16 x 64 x 32): 3-5 min when quiet, estimated;
full (48 x 512 x 48) is meant for a GPU.
Expected result: the progress lines end with "calibration: done"; every prompt has K valid
rewards (the table keeps truncated answers, `require_eos=False`; see calibration_pass).
"""

import importlib.util
import os

from infalign_jax.config_utils import parse_arg


def _ctrl_real():
    # The sizes and the task section must be those of configs/ctrl_real.py, so load it from there.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ctrl_real.py")
    spec = importlib.util.spec_from_file_location("_ctrl_real_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    a = parse_arg(arg, task="helpfulness", size="tiny", reference_seed=1)
    c = parse_arg(None)
    c.task, c.reference = _ctrl_real().task_and_reference(a)
    c.lock()
    return c
