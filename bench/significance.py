"""The studies' statistics: Welch's t-test with its interval, an exact permutation test, Holm's correction.

A study compares cells of per-seed values (FD of each seed's students, say). A verdict is a test: the
difference of means with a 95% interval and a p-value, corrected for the number of comparisons in the
report (its family). Unlike a rule on the spread of single runs, a test gains power with seeds.

    welch(a, b)        -> (mean(a) - mean(b), (low, high), p)   two-sided, unequal variances
    welch_from_stats((mean, std, n), (mean, std, n))        the same from summary statistics
    permutation(a, b)  -> p   exact, two-sided, on the difference of means (every relabelling)
    holm(ps)           -> adjusted p-values (reject where <= alpha): Holm's step-down, the family = ps
    power(delta, sd, n, alpha)  -> the chance a two-sided t-test at alpha finds a true difference delta
    seeds_for(delta, sd, alpha, target)  -> the seeds per side that reach `target` power
"""
import itertools

import numpy as np
from scipy import stats as st


def welch_from_stats(a, b, level=0.95):
    """welch() from each side's (mean, std with ddof 1, n), for results kept only as mean +- std. The
    rounding of printed means and stds moves p a little: say so beside such a p."""
    (ma, sa, na), (mb, sb, nb) = a, b
    if min(na, nb) < 2:
        raise ValueError(f"Welch's test needs 2 or more values per side, got n = {na} and {nb}")
    va, vb = sa ** 2 / na, sb ** 2 / nb
    diff, se = ma - mb, np.sqrt(va + vb)
    if se == 0:
        return float(diff), (float(diff), float(diff)), float(diff == 0)
    dof = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))
    half = st.t.ppf(0.5 + level / 2, dof) * se
    return float(diff), (float(diff - half), float(diff + half)), float(2 * st.t.sf(abs(diff) / se, dof))


def welch(a, b, level=0.95):
    """Welch's t-test on mean(a) - mean(b): -> (difference, (low, high) at `level`, two-sided p)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if min(len(a), len(b)) < 2:
        raise ValueError(f"Welch's test needs 2 or more values per side, got {len(a)} and {len(b)}")
    return welch_from_stats((a.mean(), a.std(ddof=1), len(a)), (b.mean(), b.std(ddof=1), len(b)), level)


def permutation(a, b):
    """Exact permutation p of mean(a) - mean(b) over every split of the pooled values into groups of
    len(a) and len(b); two-sided as scipy's: twice the smaller one-sided p, at most 1. Its smallest value
    is 2 / C(n, len(a)): 0.1 with 3 seeds a side, so with 3 seeds it never reaches 0.05."""
    pooled, n = np.concatenate([np.asarray(a, float), np.asarray(b, float)]), len(a)
    seen = pooled[:n].mean() - pooled[n:].mean()
    diffs = []
    for idx in itertools.combinations(range(len(pooled)), n):
        mask = np.zeros(len(pooled), bool)
        mask[list(idx)] = True
        diffs.append(pooled[mask].mean() - pooled[~mask].mean())
    diffs, eps = np.array(diffs), 1e-12 * max(1.0, abs(seen))
    return float(min(1.0, 2 * min((diffs >= seen - eps).mean(), (diffs <= seen + eps).mean())))


def holm(ps):
    """Holm's step-down adjusted p-values, in the order given (the family: all of ps)."""
    ps = np.asarray(ps, float)
    out, running = np.empty(len(ps)), 0.0
    for i, j in enumerate(np.argsort(ps, kind="stable")):
        running = max(running, min(1.0, (len(ps) - i) * ps[j]))
        out[j] = running
    return out.tolist()


def power(delta, sd, n, alpha=0.05):
    """Power of the two-sided two-sample t-test with n values a side, equal std sd, a true difference delta
    (noncentral t with 2n - 2 degrees of freedom; Welch's test with equal n and std is close to it)."""
    dof, nc = 2 * n - 2, abs(delta) / (sd * np.sqrt(2 / n))
    crit = st.t.ppf(1 - alpha / 2, dof)
    return float(st.nct.sf(crit, dof, nc) + st.nct.cdf(-crit, dof, nc))


def seeds_for(delta, sd, alpha=0.05, target=0.8, most=200):
    """The smallest n a side whose power() reaches `target` (None beyond `most`)."""
    return next((n for n in range(2, most + 1) if power(delta, sd, n, alpha) >= target), None)
