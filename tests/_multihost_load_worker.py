"""One process of a two-process job that reads finished runs; driven by `tests/test_multihost.py`.

Usage::

    python tests/_multihost_load_worker.py --process_id I --port P --out DIR

DIR/load_request.json names a CTRL run (`policy_run`, loaded as `config.task.policy.checkpoint`
does) and/or a reward-model run (`reward_run`, as `config.task.reward.kind="trained"` does); each
process loads them onto its own device and writes the parameters' digests to DIR/loaded_p<I>.json,
with what `distributed.from_primary` returned and raised on this process.
"""

from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

import _multihost_pair  # noqa: E402


def main() -> None:
    args = _multihost_pair.start()
    from infalign_jax.infra import distributed, provenance
    from infalign_jax.rewards import reward_runs
    from infalign_jax.rl.tasks import sources

    with open(os.path.join(args.out, "load_request.json"), encoding="utf-8") as f:
        request = json.load(f)
    out = {}
    if request.get("policy_run"):
        policy = sources.load_policy(sources.PolicyConfig(request["policy_run"]))
        out["policy"] = [provenance.params_digest(policy.params), policy.source]
    if request.get("reward_run"):
        run = reward_runs.load_run(request["reward_run"])
        out["reward"] = [provenance.params_digest(run.params), run.step]
    out["shared"] = distributed.from_primary("value", lambda: {"by": distributed.is_primary()})

    def fail():
        raise OSError("disk full\nsecond line")

    try:
        distributed.from_primary("failing", fail, timeout_s=60)
    except (OSError, RuntimeError) as e:
        out["failed"] = f"{type(e).__name__}: {e}"
    with open(os.path.join(args.out, f"loaded_p{args.process_id}.json"), "w",
              encoding="utf-8") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
