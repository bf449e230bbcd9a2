"""Coverage and width of `evaluation.paired_difference`'s 95% interval, by simulation.

The comparison's verdicts (`workflows/comparison_report.py`) rest on this interval, with 2-5 seeds
a method. Tables are drawn from the model the estimator assumes,

    a_sb = alpha^a_s + c_b + g_b + e_sb,    b_sb = alpha^b_s + c_b + e_sb   (true difference 0)

seed offsets alpha ~ N(0, seed_sd^2) independent per method, prompt difficulty c_b (sd 0 or 0.2),
a prompt x method interaction g_b (sd 0 or 0.1), residual e (sd 0.2); and for one method's gain
over a constant (b = 1/2, one row), the same a without g. Each cell: the share of intervals that
cover 0, and the mean width against the rule used until 2026-12-07 (the seeds' S - 1 degrees of
freedom only where the seed terms held half of Var or more), both computed vectorised and checked
against the library function on the first tables of every cell.

    .venv/bin/python bench/interval_coverage.py [--trials 4000]
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
from scipy import stats

from infalign_jax.analysis.evaluation import paired_difference


def _terms(a, b):
    """(point, prompt term, seed terms of a and b) over trials: a, b [T, S, B]."""
    num = a.shape[2]
    d = a.mean(1) - b.mean(1)
    prompt = d.var(axis=1, ddof=1) / num
    seeds = []
    for x in (a, b):
        s = x.shape[1]
        if s < 2:
            seeds.append(np.zeros(len(x)))
            continue
        rows, cols = x.mean(2), x.mean(1)
        resid = x - rows[:, :, None] - cols[:, None, :] + x.mean((1, 2))[:, None, None]
        ms = (resid ** 2).sum((1, 2)) / ((s - 1) * (num - 1))
        seeds.append(np.maximum(rows.var(axis=1, ddof=1) - ms / num, 0.0) / s)
    return a.mean((1, 2)) - b.mean((1, 2)), prompt, seeds


def intervals(a, b, rule):
    """Half-widths of the 95% intervals under `rule` ("now": the library's; "half": the
    earlier one)."""
    point, prompt, (sa, sb) = _terms(a, b)
    num, dfs = a.shape[2], [x.shape[1] - 1 for x in (a, b)]
    var = prompt + sa + sb
    den = prompt ** 2 / (num - 1)
    for v, k in zip((sa, sb), dfs):
        den = den + (v ** 2 / k if k else 0.0)
    dof = var ** 2 / np.where(den > 0, den, 1.0)
    if rule == "now":   # S - 1 of the smaller seeded method, whatever the estimates
        seeded = [k for k in dfs if k > 0]
        if seeded:
            dof = np.minimum(dof, min(seeded))
    else:   # S - 1 of the positive seed terms, where they hold half of Var or more
        kmin = np.full(len(var), np.inf)
        for v, k in zip((sa, sb), dfs):
            if k > 0:
                kmin = np.where(v > 0, np.minimum(kmin, k), kmin)
        share = (sa + sb) / np.where(var > 0, var, 1.0)
        dof = np.where(share >= 0.5, np.minimum(dof, kmin), dof)
    return point, stats.t.ppf(0.975, dof) * np.sqrt(var)


def draw(rng, trials, seeds, num, seed_sd, diff_sd, inter_sd, gain):
    c = rng.normal(0, diff_sd, (trials, 1, num))
    a = rng.normal(0, seed_sd, (trials, seeds, 1)) + c + rng.normal(0, 0.2, (trials, seeds, num))
    if gain:
        return a + 0.5, np.full((trials, 1, num), 0.5)
    a = a + rng.normal(0, inter_sd, (trials, 1, num))
    b = rng.normal(0, seed_sd, (trials, seeds, 1)) + c + rng.normal(0, 0.2, (trials, seeds, num))
    return a, b


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{args.trials} trials a cell; Monte Carlo sd of a coverage near 0.95: "
          f"{np.sqrt(0.95 * 0.05 / args.trials):.4f}")
    print("setting | S | B | difficulty | interaction | seed sd | coverage now | coverage before "
          "| width now / before")
    worst: dict[tuple, list] = {}
    for gain, s, num, diff, inter, sd in itertools.product(
            (False, True), (2, 3, 5), (32, 128), (0.0, 0.2), (0.0, 0.1), (0.0, 0.02, 0.05, 0.1, 0.3)):
        if gain and inter:
            continue
        a, b = draw(rng, args.trials, s, num, sd, diff, inter, gain)
        point, half = intervals(a, b, "now")
        _, before = intervals(a, b, "half")
        for t in range(3):   # the vectorised rule is the library's
            e = paired_difference(a[t], b[t])
            assert abs(float(e.upper) - (point[t] + half[t])) < 1e-9, (e, point[t], half[t])
        cov, cov0 = np.mean(np.abs(point) <= half), np.mean(np.abs(point) <= before)
        ratio = half.mean() / before.mean()
        name = "gain over 1/2" if gain else "two methods"
        print(f"{name} | {s} | {num} | {diff} | {inter} | {sd} | {cov:.3f} | {cov0:.3f} | "
              f"{ratio:.2f}")
        worst.setdefault((name, s), []).append((cov, cov0, ratio))
    print("\nper setting and S: lowest coverage now / before, mean and largest width ratio")
    for (name, s), rows in worst.items():
        c, c0, r = (np.array(x) for x in zip(*rows))
        print(f"{name}, S={s}: {c.min():.3f} / {c0.min():.3f}, width x{r.mean():.2f} "
              f"(up to x{r.max():.2f})")


if __name__ == "__main__":
    main()
