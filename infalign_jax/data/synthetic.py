"""Judge-labelled preference pairs made offline (for proxy reward models and the pipeline's tests).

Responses are short templated reviews whose wording varies in sentiment and intensity; each pair
is two responses to the same prompt labelled by a gold judge (e.g. VADER): the higher-scored one is
`chosen`. Pairs whose scores tie (within `min_gap`) are not emitted, so every label is defined.
The files are the generic {prompt, chosen, rejected} JSONL that `read_preferences` reads.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import numpy as np
from infalign_jax.infra.files import atomic_open

THINGS = ("pizza place", "museum", "hike", "concert", "bookshop", "train ride", "hotel", "cafe",
          "film", "park", "library", "market")
OPENERS = ("The {t} was", "I found the {t}", "Honestly, the {t} felt", "Our visit to the {t} was",
           "Overall the {t} seemed")
WORDS = ("wonderful", "great", "pleasant", "fine", "okay", "bland", "dull", "disappointing",
         "awful", "terrible", "lovely", "excellent", "mediocre", "boring", "charming", "horrible")
ENDINGS = (".", " and I would go again.", " but a bit crowded.", ", not worth the money.",
           " and the staff were kind.", ", sadly.", "!", " overall.")
INTENSIFIERS = ("", "", "really ", "very ", "quite ", "somewhat ", "absolutely ")


def _response(rs: np.random.RandomState, thing: str) -> str:
    opener = OPENERS[rs.randint(len(OPENERS))].format(t=thing)
    word = INTENSIFIERS[rs.randint(len(INTENSIFIERS))] + WORDS[rs.randint(len(WORDS))]
    return f"{opener} {word}{ENDINGS[rs.randint(len(ENDINGS))]}"


def make_judged_pairs(judge: Callable[[Sequence[str], Sequence[str]], np.ndarray], n: int,
                      seed: int = 0, min_gap: float = 1e-3, label_noise: float = 0.0
                      ) -> list[dict[str, Any]]:
    """`n` pairs {prompt, chosen, rejected} with judge(chosen) > judge(rejected) + min_gap; with
    `label_noise` > 0 each label is flipped with that probability (rows then say
    "label_flipped"), drawn apart from the pairs, which stay those of `label_noise` = 0."""
    _check_label_noise(label_noise)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rs = np.random.RandomState(seed)
    pairs: list[dict[str, str]] = []
    while len(pairs) < n:
        things = [THINGS[rs.randint(len(THINGS))] for _ in range(2 * n)]
        prompts = [f"Write one sentence reviewing the {t} you visited." for t in things]
        a = [_response(rs, t) for t in things]
        b = [_response(rs, t) for t in things]
        sa, sb = judge(prompts, a), judge(prompts, b)
        for p, x, y, s, t in zip(prompts, a, b, sa, sb):
            if abs(s - t) > min_gap and len(pairs) < n:
                chosen, rejected = (x, y) if s > t else (y, x)
                pairs.append({"prompt": p, "chosen": chosen, "rejected": rejected})
    if label_noise > 0:
        flips = np.random.RandomState([seed, 1]).rand(n) < label_noise
        pairs = [dict(p, chosen=p["rejected"], rejected=p["chosen"], label_flipped=True) if flip
                 else dict(p, label_flipped=False) for p, flip in zip(pairs, flips)]
    return pairs


def _check_label_noise(label_noise: float) -> None:
    if not 0.0 <= label_noise < 0.5:
        raise ValueError(f"label_noise must lie in [0, 0.5), got {label_noise}")


def write_jsonl(path: str, rows: Sequence[dict]) -> str:
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def pairs_from_samples(prompts: Sequence[str], responses: Sequence[Sequence[str]],
                       scores: Sequence[Sequence[float]], pairs_per_prompt: int, seed: int = 0,
                       label_noise: float = 0.0, min_gap: float = 1e-3) -> list[dict[str, str]]:
    """Preference pairs from scored samples of each prompt (the proxy-vs-gold set-up).

    For each prompt, up to `pairs_per_prompt` distinct pairs (i, j) of its samples with
    |score_i - score_j| > min_gap and different texts; the higher-scored sample is `chosen`, except
    that with probability `label_noise` the label is flipped (noisy annotators). Deterministic in
    `seed`. Each row also records the gold scores and whether its label was flipped.
    """
    _check_label_noise(label_noise)
    if len(prompts) != len(responses) or len(prompts) != len(scores):
        raise ValueError(f"prompts ({len(prompts)}), responses ({len(responses)}) and scores "
                         f"({len(scores)}) must have one entry per prompt")
    rs = np.random.RandomState(seed)
    rows: list[dict] = []
    for prompt, texts, s in zip(prompts, responses, scores):
        s = np.asarray(s, np.float64)
        if len(texts) != len(s):
            raise ValueError(f"prompt {prompt[:40]!r}: {len(texts)} responses but {len(s)} scores")
        candidates = [(i, j) for i in range(len(texts)) for j in range(i + 1, len(texts))
                      if abs(s[i] - s[j]) > min_gap and texts[i].strip() != texts[j].strip()
                      and texts[i].strip() and texts[j].strip()]
        for k in rs.permutation(len(candidates))[:pairs_per_prompt]:
            i, j = candidates[k]
            hi, lo = (i, j) if s[i] > s[j] else (j, i)
            flipped = bool(rs.rand() < label_noise)
            chosen, rejected = (lo, hi) if flipped else (hi, lo)
            rows.append({"prompt": prompt, "chosen": texts[chosen], "rejected": texts[rejected],
                         "gold_chosen": float(s[chosen]), "gold_rejected": float(s[rejected]),
                         "label_flipped": flipped})
    return rows
