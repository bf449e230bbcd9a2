"""The config of `experiments/evaluate.py` (`workflows.evaluate`): its procedures and sections.

`parse_config(config)` turns `configs/evaluate.py`'s ConfigDict into one validated frozen dataclass
per section (`SECTIONS`); unknown or missing sections and keys are refused by name, and the errors
of the `sources` sections name the keys as they are written here (`config.policy.checkpoint`, not
`config.task.policy.checkpoint`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

from infalign_jax.core import selection
from infalign_jax.infra import validate as check
from infalign_jax.infra.config_utils import UNUSED_OPTION_RULES, as_dict, dataclass_from
from infalign_jax.rewards import prefix_scorers
from infalign_jax.rl.tasks import real, sources

PROCEDURES = {
    "bon": "BoN_N(policy) vs BoN_N(pi_ref) (eval.against=base: vs pi_ref) over eval.ns",
    "won": "WoN_N(policy) vs WoN_N(pi_ref) (eval.against=base: vs pi_ref) over eval.ns",
    "rbon_kl": "RBoN-KL selection from pi_ref samples (select.rbon_kl_beta)",
    "rbon_wd": "RBoN-WD selection from pi_ref samples (select.rbon_wd_beta)",
    "uncertainty_bon": "mean - k std BoN selection over the reward ensemble (select.uncertainty_k)",
    "cd_tokenwise": "tokenwise controlled decoding of pi_ref with the trained prefix scorer",
    "cd_blockwise": "blockwise best-of-K controlled decoding of pi_ref with the prefix scorer",
}
SELECTIONS = ("rbon_kl", "rbon_wd", "uncertainty_bon")
DECODERS = ("cd_tokenwise", "cd_blockwise")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    _config_owner = "config.eval"
    task: str = "helpfulness"      # the default judge and the prompts used when data.prompts=""
    procedures: tuple = ("bon", "won", "rbon_kl", "rbon_wd", "cd_tokenwise", "cd_blockwise")
    num_prompts: int = 4           # evaluation prompts
    samples: int = 8               # M samples per prompt and side
    ns: tuple = (1, 2, 4, 8)       # the N grid, max(ns) <= samples
    max_new_tokens: int = 8
    temperature: float = 1.0       # policy and pi_ref sampling (controlled decoding: 1; KL: 1)
    seed: int = 0
    num_resamples: int = 1000      # bootstrap resamples of the prompts
    # BoN_N / WoN_N of the policy and the decoders against the same procedure on pi_ref (the
    # spec's main reading) or against plain pi_ref ("base", its alternative reading)
    against: str = "transformed"

    def __post_init__(self):
        if self.task not in real.known_tasks():
            check.fail(self, "task", f"one of {real.known_tasks()}")
        procs = tuple(self.procedures)
        object.__setattr__(self, "procedures", procs)
        unknown = [p for p in procs if p not in PROCEDURES]
        if unknown:
            raise ValueError(f"config.eval.procedures: unknown procedure(s) {unknown}; known: "
                             f"{list(PROCEDURES)}")
        if len(set(procs)) != len(procs):
            check.fail(self, "procedures", "a list without repeats")
        check.ints(self, ("num_prompts", "samples", "max_new_tokens", "num_resamples"))
        check.ints(self, ("seed",), low=0)
        check.numbers(self, ("temperature",), strict=True)
        check.choice(self, "against", selection.AGAINST)
        check.int_tuple(self, "ns", f"a non-empty list of integers in [1, eval.samples="
                                    f"{self.samples}]", high=self.samples)
        if self.num_resamples < 2:
            check.fail(self, "num_resamples", "an integer >= 2")
        at_one = [p for p in procs if p in SELECTIONS + DECODERS]
        if self.temperature != 1.0 and at_one:
            # their pool / blocks / candidates are pi_ref's own samples, so their KL bounds (log
            # N, the BoN bound) and the pi_ref rows they are compared with hold at temperature 1
            raise ValueError(f"config.eval.temperature={self.temperature}: the procedures "
                             f"{at_one} select among or decode from pi_ref's samples at "
                             f"temperature 1 (their KL bounds hold there); evaluate them at 1, "
                             f"or leave them out of config.eval.procedures")
        if len(set(self.ns)) != len(self.ns):
            check.fail(self, "ns", "a list without repeats (each N is one row per procedure)")


@dataclasses.dataclass(frozen=True)
class SelectConfig:
    _config_owner = "config.select"
    rbon_kl_beta: float = 0.1      # r + beta * log pi_ref(y)
    rbon_wd_beta: float = 1.0      # r + beta * mean cosine similarity
    uncertainty_k: float = 1.0     # mean - k * std (or var) over the ensemble members
    uncertainty_penalty: str = "std"

    def __post_init__(self):
        check.numbers(self, ("rbon_kl_beta", "rbon_wd_beta", "uncertainty_k"))
        check.choice(self, "uncertainty_penalty", selection.PENALTIES)


@dataclasses.dataclass(frozen=True)
class CDConfig:
    _config_owner = "config.cd"
    lam: float = 5.0               # tokenwise: pi_ref(z) exp(lam * V([x, y, z])) over the top-k
    top_k: int = 8                 # tokenwise candidates per step (also CD-Q's next tokens)
    num_candidates: int = 4        # blockwise: K blocks per step
    block_size: int = 4            # blockwise: M tokens per block
    scorer_method: str = "fudge"   # "fudge" | "cdq"
    scorer_prompts: int = 4        # training prompts, disjoint from the evaluation prompts
    scorer_samples: int = 8        # pi_ref samples per training prompt, scored by the judge
    scorer_steps: int = 60         # full-batch Adam steps
    scorer_learning_rate: float = 3e-3
    scorer_d_model: int = 32       # the fresh value model: width (a multiple of 4), depth
    scorer_layers: int = 2

    def __post_init__(self):
        check.numbers(self, ("lam",))
        check.ints(self, ("top_k", "num_candidates", "block_size", "scorer_prompts",
                          "scorer_samples", "scorer_steps", "scorer_d_model", "scorer_layers"))
        check.choice(self, "scorer_method", prefix_scorers.SCORER_METHODS)
        check.numbers(self, ("scorer_learning_rate",), strict=True)
        if self.scorer_d_model % 4:
            check.fail(self, "scorer_d_model", "a multiple of 4")


SECTIONS = {"policy": sources.PolicyConfig, "reference": sources.PolicyConfig,
            "reward": sources.RewardConfig, "data": sources.PromptsConfig, "eval": EvalConfig,
            "select": SelectConfig, "cd": CDConfig}


@contextlib.contextmanager
def renamed_errors(**keys: str) -> Iterator[None]:
    """ValueErrors of `sources` name `config.task.<x>`; here the keys live elsewhere."""
    try:
        yield
    except ValueError as e:
        text = str(e)
        for old, new in keys.items():
            text = text.replace(old.replace("__", "."), new)
        for new in keys.values():  # dataclass_from's prefix before an already-named key
            text = text.replace(f"{new}: {new}", new)
        raise ValueError(text) from e


def parse_config(config: Any) -> dict[str, Any]:
    """Every section of `config` as its dataclass; unknown or missing sections are refused."""
    names = set(as_dict(config))
    if names != set(SECTIONS):
        raise ValueError(f"config: sections {sorted(names)} differ from the known "
                         f"{sorted(SECTIONS)} (unknown {sorted(names - set(SECTIONS))}, missing "
                         f"{sorted(set(SECTIONS) - names)})")
    out = {}
    for name, cls in SECTIONS.items():
        values = as_dict(config[name])
        if "checkpoints" in values:
            values["checkpoints"] = tuple(values["checkpoints"] or ())
        owner = getattr(cls, "_config_owner")
        with renamed_errors(**{owner.replace(".", "__"): f"config.{name}"}):
            out[name] = dataclass_from(cls, values, name)
    return out


# The select / cd options and the procedures that read them (any of several).
OPTION_READERS = {
    "select.rbon_kl_beta": ("rbon_kl",), "select.rbon_wd_beta": ("rbon_wd",),
    "select.uncertainty_k": ("uncertainty_bon",),
    "select.uncertainty_penalty": ("uncertainty_bon",),
    "cd.lam": ("cd_tokenwise",), "cd.num_candidates": ("cd_blockwise",),
    "cd.block_size": ("cd_blockwise",),
    **{f"cd.{k}": DECODERS for k in ("top_k", "scorer_method", "scorer_prompts",
                                     "scorer_samples", "scorer_steps", "scorer_learning_rate",
                                     "scorer_d_model", "scorer_layers")}}


def unused_procedure_options(config: Any) -> dict[str, str]:
    """An evaluate config's select / cd options that no chosen procedure reads (an override of
    one gave results identical to the run without it, recorded as if used)."""
    if not {"eval", "select", "cd"} <= set(config):
        return {}
    procedures = set((config["eval"] or {}).get("procedures") or ())
    unread = {option: f"config.eval.procedures holding {' or '.join(map(repr, readers))}"
              for option, readers in OPTION_READERS.items() if not procedures & set(readers)}
    # cd.top_k (listed above under both decoders): the tokenwise decoder's candidates, and the
    # targets of a CD-Q scorer's training (CD-FUDGE's reads none)
    cdq = (config["cd"] or {}).get("scorer_method") == "cdq" and procedures & set(DECODERS)
    if "cd_tokenwise" not in procedures and not cdq:
        unread["cd.top_k"] = ("config.eval.procedures holding 'cd_tokenwise', or a CD "
                              "procedure with cd.scorer_method='cdq'")
    return unread


UNUSED_OPTION_RULES.append(unused_procedure_options)
