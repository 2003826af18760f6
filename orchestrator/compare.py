"""Honest comparisons across a sweep's trials: the seeds of each variant aggregated into a mean with a 95% interval,
and every pair of variants compared, metric by metric, with a verdict at 95% and its effect size.

A trial's *variant* for comparison is every axis except the seed: the sweep file's variant name with its non-seed
grid values (``ddpm``, ``ddpm sample.steps=10``). Its seeds are repeated measurements of that variant.

- **Interval of a variant** (``aggregate``). With n >= 2 seeds: the t interval over the seeds,
  mean +- t(0.975, n-1) s / sqrt(n); it holds training and evaluation noise alike. With one seed: the trial's own
  standard error (``fid_stderr``, ``kid_stderr``, ``bpd_ode_stderr``, ...) stands in, mean +- 1.96 stderr, which
  holds the evaluation's noise only (not that of training); the method says so. Without either: no interval.
- **Verdict of a pair** (``compare``). Variants that share n >= 2 seeds: a paired t test on the per-seed differences
  (the seed fixes the data split and the initial weights' stream, so the pairs are matched). Otherwise the two
  means' standard errors (each from its seeds, or its per-trial stderr for one seed) combine into a normal test.
  ``better`` / ``worse`` when the 95% interval of the difference excludes 0 in the metric's good / bad direction,
  else ``not distinguishable``. Effect size: the difference, its interval, the difference relative to the second
  variant's mean and, for paired tests, the standardized mean difference d_z = mean / sd of the differences.
  Verdicts are per pair and metric at 95% each, not corrected for the number of comparisons.

Pure functions over ``TrialRecord``s: the report (``orchestrator.report``) reads the records from MLflow."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from itertools import combinations
from typing import Optional

from scipy import stats

LEVEL = 0.95
SEED_AXIS = "seed"

# The metrics that rank variants, each with the metric holding its per-trial standard error (None: it has none)
# and whether lower is better. Inverse-problem metrics (<stage>_psnr, <stage>_ssim) are higher-is-better.
RANKED: dict[str, tuple[Optional[str], bool]] = {
    "fid": ("fid_stderr", True),
    "fid_inf": (None, True),
    "kid": ("kid_stderr", True),
    "bpd_ode": ("bpd_ode_stderr", True),
    "bpd_elbo": ("bpd_elbo_stderr", True),
}
HIGHER_IS_BETTER_SUFFIXES = ("_psnr", "_ssim")


def ranked_metrics(metric_names) -> list[str]:
    """The ranking metrics among ``metric_names``, in a fixed order: RANKED's, then inverse-problem ones."""
    names = set(metric_names)
    inverse = sorted(n for n in names if n.endswith(HIGHER_IS_BETTER_SUFFIXES) and not n.endswith("_stderr"))
    return [m for m in RANKED if m in names] + inverse


def lower_is_better(metric: str) -> bool:
    return RANKED[metric][1] if metric in RANKED else not metric.endswith(HIGHER_IS_BETTER_SUFFIXES)


def stderr_metric(metric: str) -> Optional[str]:
    return RANKED[metric][0] if metric in RANKED else None


@dataclass
class TrialRecord:
    """One trial as its evaluation run recorded it."""

    name: str
    variant: str  # the comparison variant: the variant name and every non-seed axis
    seed: Optional[int]
    status: str  # FINISHED, FAILED, KILLED, RUNNING; STOPPED: by the sweep's scheduler, not evaluated
    metrics: dict = field(default_factory=dict)
    error: str = ""
    run_id: str = ""
    training_run_id: str = ""
    train_seconds: Optional[float] = None
    eval_seconds: Optional[float] = None
    axes: dict = field(default_factory=dict)  # the sweep's varying grid axes, the seed included
    params: dict = field(default_factory=dict)  # the run's params: the trial's whole config
    skipped: dict = field(default_factory=dict)  # metric -> why it was not measured (the run's <metric>.skipped tags)


def variant_label(name: str, axes: dict) -> str:
    """``ddpm`` or ``ddpm sample.steps=10,sample.sampler=ddim``: the variant name and its non-seed axes."""
    rest = ",".join(f"{k}={v}" for k, v in sorted(axes.items()) if k not in (SEED_AXIS, "variant"))
    return f"{name} {rest}" if rest else name


@dataclass
class Interval:
    """A variant's value of one metric: the mean over ``n`` seeds and the 95% interval (``low``, ``high``; None
    when nothing gives one), by ``method``."""

    mean: float
    low: Optional[float]
    high: Optional[float]
    n: int
    method: str
    sem: Optional[float] = None  # standard error of the mean

    @property
    def half_width(self) -> Optional[float]:
        return None if self.low is None else (self.high - self.low) / 2


@dataclass
class VariantSummary:
    variant: str
    trials: list[TrialRecord]
    metrics: dict[str, Interval]

    @property
    def seeds(self) -> list:
        return [t.seed for t in self.trials]


@dataclass
class Verdict:
    """``a`` against ``b`` on ``metric``: ``outcome`` better / worse / not distinguishable (a relative to b) at
    95%; ``difference`` = mean of a - b, with its 95% interval; ``relative`` = difference / mean of b;
    ``effect`` = d_z for paired tests; ``p`` the two-sided p-value."""

    a: str
    b: str
    metric: str
    outcome: str
    difference: float
    low: float
    high: float
    p: float
    n: int
    method: str
    relative: Optional[float] = None
    effect: Optional[float] = None

    def sentence(self) -> str:
        what = {"better": "beats", "worse": "is worse than"}.get(self.outcome)
        ci = f"difference {self.difference:+.4g}, 95% CI [{self.low:+.4g}, {self.high:+.4g}]"
        if self.relative is not None:
            ci += f", {100 * self.relative:+.1f}%"
        ci += f", p = {self.p:.3g}; {self.method}"
        if what is None:
            return f"{self.a} and {self.b} are not distinguishable on {self.metric} at 95% ({ci})"
        return f"{self.a} {what} {self.b} on {self.metric} at 95% ({ci})"


def finished(records: list[TrialRecord]) -> list[TrialRecord]:
    return [r for r in records if r.status == "FINISHED"]


def group(records: list[TrialRecord]) -> dict[str, list[TrialRecord]]:
    """The finished trials by comparison variant, in the order of first appearance."""
    groups: dict[str, list[TrialRecord]] = {}
    for record in finished(records):
        groups.setdefault(record.variant, []).append(record)
    return groups


def interval(values: list[float], stderr: Optional[float] = None, level: float = LEVEL) -> Optional[Interval]:
    """Mean and interval of one variant's per-seed ``values`` (see the module's doc); ``stderr``: the single seed's
    per-trial standard error. None when there are no values."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    n = len(values)
    if n == 0:
        return None
    mean = sum(values) / n
    if n >= 2:
        sem = statistics.stdev(values) / math.sqrt(n)  # exactly 0 for equal values (scipy's tstd is not)
        half = stats.t.ppf(0.5 + level / 2, n - 1) * sem
        return Interval(mean, mean - half, mean + half, n, f"t interval over {n} seeds", sem)
    if stderr is not None and math.isfinite(stderr):
        half = stats.norm.ppf(0.5 + level / 2) * stderr
        return Interval(mean, mean - half, mean + half, 1, "one seed: the trial's own stderr (evaluation noise only)",
                        stderr)
    return Interval(mean, None, None, 1, "one seed and no per-trial stderr: no interval")


def aggregate(records: list[TrialRecord], metrics: Optional[list[str]] = None) -> list[VariantSummary]:
    """Per comparison variant, the interval of each ranking metric (``metrics``, default: those the trials
    logged) and of the floor-relative FID (``fid_over_floor`` = fid / fid_reference)."""
    groups = group(records)
    if metrics is None:
        metrics = ranked_metrics({m for r in finished(records) for m in r.metrics})
    out = []
    for variant, trials in groups.items():
        summary = {}
        for metric in [*metrics, "fid_over_floor"]:
            values = [_value(t, metric) for t in trials]
            se_name = stderr_metric(metric)
            single_se = trials[0].metrics.get(se_name) if se_name and len(trials) == 1 else None
            found = interval(values, single_se)
            if found is not None:
                summary[metric] = found
        out.append(VariantSummary(variant, trials, summary))
    return out


def _value(record: TrialRecord, metric: str) -> Optional[float]:
    if metric == "fid_over_floor":
        fid, floor = record.metrics.get("fid"), record.metrics.get("fid_reference")
        return fid / floor if fid is not None and floor else None
    return record.metrics.get(metric)


def compare_pair(a: VariantSummary, b: VariantSummary, metric: str, level: float = LEVEL) -> Optional[Verdict]:
    """``a`` against ``b`` on ``metric`` (see the module's doc); None when either lacks it or no test applies."""
    if metric not in a.metrics or metric not in b.metrics:
        return None
    lower = lower_is_better(metric)
    seeds_a = {t.seed: _value(t, metric) for t in a.trials if _value(t, metric) is not None}
    seeds_b = {t.seed: _value(t, metric) for t in b.trials if _value(t, metric) is not None}
    shared = sorted(s for s in seeds_a if s in seeds_b and s is not None)
    mean_b = b.metrics[metric].mean
    if len(shared) >= 2:
        diffs = [seeds_a[s] - seeds_b[s] for s in shared]
        n = len(diffs)
        mean = sum(diffs) / n
        sd = statistics.stdev(diffs)
        if sd > 0:
            sem = sd / math.sqrt(n)
            half = stats.t.ppf(0.5 + level / 2, n - 1) * sem
            p = float(2 * stats.t.sf(abs(mean) / sem, n - 1))
            return _verdict(a, b, metric, lower, mean, half, p, n, f"paired t test over {n} shared seeds",
                            mean_b, effect=mean / sd)
    ia, ib = a.metrics[metric], b.metrics[metric]
    if ia.sem is None or ib.sem is None:
        return None
    mean = ia.mean - ib.mean
    sem = math.hypot(ia.sem, ib.sem)
    if sem == 0:
        return None
    half = stats.norm.ppf(0.5 + level / 2) * sem
    p = float(2 * stats.norm.sf(abs(mean) / sem))
    single = [s.variant for s in (a, b) if s.metrics[metric].n == 1]
    method = "normal test of the two means' standard errors"
    if single:
        method += f" (one seed of {', '.join(single)}: its per-trial stderr stands in, evaluation noise only)"
    return _verdict(a, b, metric, lower, mean, half, p, min(ia.n, ib.n), method, mean_b)


def _verdict(a, b, metric, lower, mean, half, p, n, method, mean_b, effect=None) -> Verdict:
    low, high = mean - half, mean + half
    if high < 0 or low > 0:
        outcome = "better" if (high < 0) == lower else "worse"
    else:
        outcome = "not distinguishable"
    relative = mean / mean_b if mean_b else None
    return Verdict(a.variant, b.variant, metric, outcome, mean, low, high, p, n, method, relative, effect)


def compare(summaries: list[VariantSummary], metrics: Optional[list[str]] = None) -> list[Verdict]:
    """Every pair of variants (in the sweep's order) on every ranking metric both have."""
    if metrics is None:
        metrics = ranked_metrics({m for s in summaries for m in s.metrics})
    verdicts = []
    for a, b in combinations(summaries, 2):
        for metric in metrics:
            verdict = compare_pair(a, b, metric)
            if verdict is not None:
                verdicts.append(verdict)
    return verdicts
