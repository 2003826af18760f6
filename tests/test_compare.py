"""Seeds aggregated and variants compared (orchestrator.compare), against closed forms and independent
references: Student's t constants, scipy's own paired t test, and the coverage and false-positive rates of the
intervals and verdicts over many simulated sweeps."""
import math

import numpy as np
import pytest
from scipy import stats

from orchestrator.compare import (TrialRecord, aggregate, compare, compare_pair, interval, ranked_metrics,
                                  variant_label)


def record(variant, seed, status="FINISHED", **metrics):
    return TrialRecord(f"{variant}-seed={seed}", variant, seed, status, metrics)


def test_interval_is_the_t_interval_over_seeds():
    # two seeds: mean +- t(0.975, 1) s / sqrt(2), t(0.975, 1) = 12.7062 (the table's constant)
    found = interval([3.497, 3.081])
    s = abs(3.497 - 3.081) / math.sqrt(2)
    assert found.mean == pytest.approx(3.289)
    assert found.half_width == pytest.approx(12.7062 * s / math.sqrt(2), rel=1e-5)
    low, high = stats.t.interval(0.95, 1, loc=3.289, scale=stats.sem([3.497, 3.081]))
    assert (found.low, found.high) == pytest.approx((low, high))
    assert found.n == 2 and "t interval" in found.method


def test_one_seed_uses_the_trials_stderr_and_says_so():
    found = interval([5.0], stderr=0.5)
    assert found.half_width == pytest.approx(1.959964 * 0.5, rel=1e-6)
    assert "one seed" in found.method and "evaluation noise only" in found.method
    bare = interval([5.0])
    assert bare.low is None and "no interval" in bare.method
    assert interval([]) is None and interval([float("nan")]) is None


def test_t_interval_covers_the_true_mean_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(4000):
        found = interval(list(rng.normal(10.0, 2.0, size=3)))
        hits += found.low <= 10.0 <= found.high
    assert 0.94 <= hits / 4000 <= 0.96  # binomial sd at 4000 draws: 0.0034


def test_paired_verdict_matches_scipys_paired_t_test():
    a = [record("ddpm", s, fid=v) for s, v in enumerate([3.5, 3.1, 3.3, 2.9])]
    b = [record("ncsn", s, fid=v) for s, v in enumerate([5.9, 4.4, 5.0, 4.8])]
    summaries = aggregate(a + b)
    verdict = compare_pair(summaries[0], summaries[1], "fid")
    reference = stats.ttest_rel([3.5, 3.1, 3.3, 2.9], [5.9, 4.4, 5.0, 4.8])
    assert verdict.p == pytest.approx(reference.pvalue, rel=1e-9)
    diffs = np.array([3.5, 3.1, 3.3, 2.9]) - np.array([5.9, 4.4, 5.0, 4.8])
    assert verdict.difference == pytest.approx(diffs.mean())
    assert verdict.effect == pytest.approx(diffs.mean() / diffs.std(ddof=1))
    assert verdict.relative == pytest.approx(diffs.mean() / np.mean([5.9, 4.4, 5.0, 4.8]))
    assert verdict.outcome == "better" and "paired t test over 4 shared seeds" in verdict.method
    assert verdict.sentence().startswith("ddpm beats ncsn on fid at 95%")
    # the same comparison the other way round is "worse"; higher is better for PSNR
    assert compare_pair(summaries[1], summaries[0], "fid").outcome == "worse"
    psnr = aggregate([record("x", s, inpaint_psnr=v) for s, v in enumerate([20, 21, 22])] +
                     [record("y", s, inpaint_psnr=v) for s, v in enumerate([10, 12, 11])])
    assert compare_pair(psnr[0], psnr[1], "inpaint_psnr").outcome == "better"


def test_two_seeds_that_disagree_are_not_distinguishable():
    # the demo's FIDs: the differences 2.36 and 1.35 have a t of 3.7 on one degree of freedom (p = 0.17)
    records = [record("ddpm", 0, fid=3.497), record("ddpm", 1, fid=3.081),
               record("ncsn", 0, fid=5.856), record("ncsn", 1, fid=4.431)]
    verdict = compare(aggregate(records))[0]
    assert verdict.outcome == "not distinguishable"
    assert verdict.p == pytest.approx(stats.ttest_rel([3.497, 3.081], [5.856, 4.431]).pvalue)
    assert "not distinguishable on fid at 95%" in verdict.sentence()


def test_paired_test_holds_its_false_positive_rate():
    """Under no difference, with a large seed effect shared by the pair, 5% of verdicts call a winner; an unpaired
    test would lose the power the pairing gives, the paired one keeps it when there is a real difference."""
    rng = np.random.default_rng(1)
    wrong = found = 0
    for _ in range(2000):
        seed_effect = rng.normal(0, 3.0, size=4)
        same = aggregate([record("a", s, fid=10 + seed_effect[s] + rng.normal(0, 0.3)) for s in range(4)] +
                         [record("b", s, fid=10 + seed_effect[s] + rng.normal(0, 0.3)) for s in range(4)])
        wrong += compare_pair(same[0], same[1], "fid").outcome != "not distinguishable"
        shifted = aggregate([record("a", s, fid=9 + seed_effect[s] + rng.normal(0, 0.3)) for s in range(4)] +
                            [record("b", s, fid=10 + seed_effect[s] + rng.normal(0, 0.3)) for s in range(4)])
        found += compare_pair(shifted[0], shifted[1], "fid").outcome == "better"
    assert 0.04 <= wrong / 2000 <= 0.06
    assert found / 2000 > 0.8  # a difference of 1 against a per-seed noise of 0.42 in the differences


def test_single_seeds_compare_by_their_standard_errors():
    records = [record("a", 0, fid=3.0, fid_stderr=0.3), record("b", 0, fid=5.0, fid_stderr=0.4)]
    summaries = aggregate(records)
    verdict = compare_pair(summaries[0], summaries[1], "fid")
    se = math.hypot(0.3, 0.4)  # = 0.5
    assert verdict.low == pytest.approx(-2.0 - 1.959964 * se, rel=1e-6)
    assert verdict.p == pytest.approx(2 * stats.norm.sf(2.0 / se))
    assert verdict.outcome == "better" and "per-trial stderr stands in" in verdict.method
    # no stderr (fid_inf has none): no interval, no verdict rather than a made-up one
    bare = aggregate([record("a", 0, fid_inf=3.0), record("b", 0, fid_inf=5.0)])
    assert compare_pair(bare[0], bare[1], "fid_inf") is None


def test_aggregate_groups_by_every_axis_but_the_seed_and_leaves_out_failures():
    assert variant_label("ddpm", {"seed": 1, "sample.steps": 10, "variant": "ddpm"}) == "ddpm sample.steps=10"
    records = [record("ddpm", 0, fid=3.0, fid_reference=0.5), record("ddpm", 1, fid=4.0, fid_reference=0.5),
               record("ddpm", 2, status="FAILED"), record("ncsn", 0, fid=6.0, fid_reference=0.6)]
    summaries = aggregate(records)
    assert [s.variant for s in summaries] == ["ddpm", "ncsn"]
    assert summaries[0].seeds == [0, 1]
    assert summaries[0].metrics["fid_over_floor"].mean == pytest.approx(7.0)
    assert summaries[1].metrics["fid_over_floor"].mean == pytest.approx(10.0)
    assert ranked_metrics({"kid", "fid", "inpaint_psnr", "inpaint_psnr_stderr", "loss"}) == ["fid", "kid", "inpaint_psnr"]
