"""Judge-labelled preference pairs made offline (for proxy reward models and the pipeline's tests).

Responses are short templated reviews whose wording varies in sentiment and intensity; each pair
is two responses to the same prompt labelled by a gold judge (e.g. VADER): the higher-scored one is
`chosen`. Pairs whose scores tie (within `min_gap`) are not emitted, so every label is defined.
The files are the generic {prompt, chosen, rejected} JSONL that `read_preferences` reads.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import numpy as np

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
                      seed: int = 0, min_gap: float = 1e-3) -> list[dict[str, str]]:
    """`n` pairs {prompt, chosen, rejected} with judge(chosen) > judge(rejected) + min_gap."""
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
    return pairs


def write_jsonl(path: str, rows: Sequence[dict]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path
