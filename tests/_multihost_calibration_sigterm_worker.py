"""One process of a two-process calibration pass that may get a SIGTERM; driven by
`tests/test_multihost.py::test_a_sigterm_stops_both_processes_of_a_calibration_pass_at_one_chunk`.

Usage::

    python tests/_multihost_calibration_sigterm_worker.py --process_id I --port P --out DIR

Each process draws its share of `tests/test_calibration_pass.py`'s prompts (one a batch, so
process 0 draws two batches and process 1 one) with a partial file in DIR and prints its
progress. A first run (no partial file in DIR yet) scores each chunk slowly, so that a SIGTERM
comes mid-pass; a resumed run at full speed. A SIGTERM ends it with `preemption.Preempted` (exit
status 143); a finished pass writes DIR/table_p<I>.npz.
"""

from __future__ import annotations

import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

import _multihost_pair  # noqa: E402

SECONDS_A_CHUNK = 0.3
# A SIGTERM sent after process 0's second chunk stops both some chunks later (after chunk 3 to
# 7 in five logged runs on 2 cores): with 6 chunks a batch, 2 runs of 5 stopped only at the first
# batch's end, where the test cannot tell a stop mid-pass from a batch's end. 18 leave room.
CHUNKS = 18


def the_pass(reward=None, **kwargs):
    """`tests/test_calibration_pass.py`'s tiny pass (its `_run`) as each process runs it here
    (one prompt a batch, 2 samples a chunk, CHUNKS chunks a batch), scored by `reward` (its count
    reward when None); on one process, the table the two must both return."""
    import test_calibration_pass as tc
    from infalign_jax.decoding import sampling
    return tc._run(
        reward_fn=reward or tc.count_reward, k=2 * CHUNKS, batch_prompts=1,
        sampling_cfg=sampling.SamplingConfig(n=2, max_new_tokens=6, eos_id=tc.EOS, pad_id=0),
        **kwargs)


def main() -> None:
    # looked at before joining the job, which the other process's first partial file follows:
    # after it, a process slow to start could take the other's new file for a resume's
    args = _multihost_pair.arguments()
    resumed = any(name.startswith("partial") for name in os.listdir(args.out))
    _multihost_pair.start(args)
    import numpy as np

    import test_calibration_pass as tc

    def slow_reward(rp, idx, resp, mask):
        time.sleep(SECONDS_A_CHUNK)
        return tc.count_reward(rp, idx, resp, mask)

    table = the_pass(None if resumed else slow_reward,
                     partial_path=os.path.join(args.out, "partial.npz"),
                     progress=lambda line: print(line, flush=True))
    np.savez(os.path.join(args.out, f"table_p{args.process_id}.npz"),
             sorted_rewards_BxK=table.sorted_rewards_BxK, counts_B=table.counts_B)


if __name__ == "__main__":
    main()
