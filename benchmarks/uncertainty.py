"""Benchmark what FID's uncertainty costs: compute_fid with its jackknife standard errors and FID-infinity
against compute_fid without them, in one run, on the demo's features and on a 2-D set.

    python benchmarks/uncertainty.py [--repeats 5] [--threads 1] [--cache-dir DIR]

Cases (the samples are real held-out data standing in for a model's: the cost does not depend on where the
samples come from):
1. digits: the 359 test images against the train split in the classifier's 128-d features (the demo's FID
   before 2026-12-07; too few samples for FID-infinity, which says so in a tag and costs nothing);
2. digits, 720 samples (the demo's since): FID and its stderr on the first 359, FID-infinity on all 720 (the
   test images and 361 train images standing in);
3. moons: 1,600 test points against 6,400 train points in raw 2-d coordinates (both extras computed).

For each: seconds of compute_fid without the extras (``stderr=False, fid_inf=False``; the reference features
cached, as in a trial after the first), with them, and the ratio, best of ``--repeats``. A second table: the
seconds of KID itself (``kernel_distance``, kid and kid_reference) and of its two jackknife standard errors
(``kid_jackknife``: kid_stderr and kid_reference_stderr, against the whole reference split), which compute_fid
adds with ``kid=True, stderr=True``. The extras' absolute
seconds are what a trial pays on top of its training and sampling (minutes): see docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from diffusion.config import DataConfig  # noqa: E402
from diffusion.data import load_dataset  # noqa: E402
from diffusion.metrics import (compute_fid, get_extractor, kernel_distance, kid_jackknife,  # noqa: E402
                               reference_features)


def best_seconds(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/diffusion-orchestrator"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# FID uncertainty cost, {time.strftime('%Y-%m-%d')}, {platform.machine()}, torch threads {args.threads}, "
          f"jackknife standard errors, best of {args.repeats}\n")
    print("| case | n | features | FID s | FID + stderr + fid_inf s | ratio | extra s | fid | fid_stderr | fid_inf |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    cases = (("digits", "digits", {"extractor": "classifier"}, lambda data: data.test),
             ("digits, 720 samples", "digits", {"extractor": "classifier"},
              lambda data: torch.cat([data.test, data.train[: 720 - len(data.test)]])),
             ("moons", "moons", {"extractor": "raw"}, lambda data: data.test))
    for case, name, options, draw in cases:
        dataset = load_dataset(DataConfig(name=name))
        samples = draw(dataset)
        common = {**options, "cache_dir": args.cache_dir, "kid": False}
        compute_fid(samples, dataset, **common)  # train the classifier, cache the reference features
        plain = best_seconds(lambda: compute_fid(samples, dataset, **common, stderr=False, fid_inf=False),
                             args.repeats)
        full_result = compute_fid(samples, dataset, **common)
        full = best_seconds(lambda: compute_fid(samples, dataset, **common), args.repeats)
        fid_inf = (f"{full_result.fid_inf.fid_inf:.4f} (of {len(samples)})" if full_result.fid_inf
                   else "skipped (n < 5 D)")
        dim = "128-d classifier" if name == "digits" else "2-d raw"
        print(f"| {case} | {full_result.n} | {dim} | {plain:.3f} | {full:.3f} | {full / plain:.2f} | "
              f"{full - plain:.3f} | {full_result.fid:.4f} | {full_result.fid_stderr:.4f} | {fid_inf} |")
    print("\n| case | n | reference rows | features | KID s (kid, kid_reference) | kid_stderr + kid_reference_stderr s "
          "| kid | kid_stderr | of which the samples' |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, extractor in (("digits", "classifier"), ("moons", "raw")):
        dataset = load_dataset(DataConfig(name=name))
        extractor, extract, info = get_extractor(extractor, dataset, cache_dir=args.cache_dir)
        reference = reference_features(dataset, "train", extractor, extract, info, args.cache_dir).features
        samples = extract(dataset.test)
        kid = best_seconds(lambda: [kernel_distance(reference, samples) for _ in range(2)], args.repeats)
        stderr = best_seconds(lambda: [kid_jackknife(reference, samples) for _ in range(2)], args.repeats)
        result = kid_jackknife(reference, samples)
        print(f"| {name} | {len(samples)} | {len(reference)} | {samples.shape[1]}-d {extractor} | {kid:.3f} | "
              f"{stderr:.3f} | {kernel_distance(reference, samples):.5f} | {result.stderr:.5f} | "
              f"{result.stderr_samples:.5f} |")


if __name__ == "__main__":
    main()
