"""The sweep report (orchestrator.report) from results built by hand: what it shows follows what the sweep varies,
its numbers are the comparison's, and report.html needs nothing but itself."""
import io
import math
from html.parser import HTMLParser

import pytest
from PIL import Image

from orchestrator.collect import SweepResults
from orchestrator.compare import TrialRecord, interval
from orchestrator.report import build, comparison_table, metric_key, write


def png(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def sweep_results(varying=("variant", "seed", "sample.steps")):
    records, curves = [], {}
    for variant, base in (("ddpm", 3.0), ("ncsn", 5.0)):
        for steps, nfe in ((10, 10.0), (100, 100.0)):
            for seed in (0, 1):
                axes = {"seed": seed, "sample.steps": steps} if "sample.steps" in varying else {"seed": seed}
                label = f"{variant} sample.steps={steps}" if "sample.steps" in varying else variant
                name = f"{variant}-seed={seed},sample.steps={steps}"
                records.append(TrialRecord(
                    name, label, seed, "FINISHED",
                    {"fid": base + 10 / nfe + 0.1 * seed, "fid_stderr": 0.3, "fid_reference": 0.5,
                     "bpd_ode": base / 2 + 0.01 * seed, "sample_nfe": nfe},
                    run_id=f"run-{name}", training_run_id=f"train-{variant}-{seed}", train_seconds=60.0,
                    eval_seconds=30.0, axes=axes, params={"sample.sampler": "ddim"},
                    skipped={"fid_inf": "fid_inf needs at least 640 samples of 128-d features, got 359"}))
            curves[f"train-{variant}-0"] = [(50, 1.0), (100, 0.5)]
    records.append(TrialRecord("ncsn-broken", "ncsn broken", 0, "FAILED", error="TrainingDiverged: loss is nan"))
    return SweepResults("demo", "1", "a" * 32, "FAILED", list(varying), len(records), records, curves=curves,
                        training_names={k: f"train {k}" for k in curves},
                        images={r.name: png((30 * i, 0, 0)) for i, r in enumerate(records[:8])})


def test_report_shows_what_the_sweep_varies_with_the_comparisons_numbers():
    report = build(sweep_results())
    assert set(report.plots) == {"metrics.png", "fid_vs_nfe.png", "train_loss.png"}
    for plot in report.plots.values():
        image = Image.open(io.BytesIO(plot))
        assert image.size[0] >= 400 and len(set(image.convert("L").tobytes())) > 10  # drawn, not blank
    ddpm_10 = next(v for v in report.variants if v.variant == "ddpm sample.steps=10")
    expected = interval([3.0 + 1.0, 3.0 + 1.0 + 0.1])
    assert ddpm_10.metrics["fid"].mean == pytest.approx(expected.mean)
    assert f"{expected.mean:.3f} ± {expected.half_width:.3f} (n=2)" in report.markdown
    assert "ddpm sample.steps=10 beats ncsn sample.steps=10 on fid at 95%" in report.markdown
    assert "fid_inf not measured: fid_inf needs at least 640 samples" in report.markdown
    assert "FAILED: ncsn-broken: TrainingDiverged: loss is nan" in report.markdown
    assert "FAILED: ncsn-broken" in report.summary and "verdicts at 95%:" in report.summary
    # a variant whose only trial failed has no row
    assert [v.variant for v in report.variants] == ["ddpm sample.steps=10", "ddpm sample.steps=100",
                                                    "ncsn sample.steps=10", "ncsn sample.steps=100"]
    # bits/dim per weighting only when the weighting varies; FID against NFE only when sample.steps does
    assert set(build(sweep_results(("variant", "seed"))).plots) == {"metrics.png", "train_loss.png"}


def test_html_is_self_contained_and_files_land_next_to_it(tmp_path):
    report = build(sweep_results())

    class Sources(HTMLParser):
        sources, links = [], []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag in ("img", "script", "link", "iframe"):
                self.sources.append(attrs.get("src") or attrs.get("href") or "")

    parser = Sources()
    parser.feed(report.html)
    assert len(parser.sources) == 3 + 8  # plots and sample grids, all embedded
    assert all(src.startswith("data:image/png;base64,") for src in parser.sources)
    path = write(report, str(tmp_path))
    assert open(path).read() == report.html
    for name in report.plots:
        assert (tmp_path / "report_files" / name).read_bytes() == report.plots[name]
        assert f"](report_files/{name})" in (tmp_path / "report.md").read_text()
    assert oct((tmp_path / "report.html").stat().st_mode & 0o777) == "0o644"


def test_comparison_table_and_metric_keys():
    report = build(sweep_results())
    table = comparison_table(report)
    assert table["variant"][0] == "ddpm sample.steps=10"
    found = report.variants[0].metrics["fid"]
    assert (table["fid"][0], table["fid_low"][0], table["fid_high"][0]) == (found.mean, found.low, found.high)
    assert all(image.size == (20, 20) for image in table["samples"])
    assert metric_key("ddpm sample.steps=10,x=1", "fid") == "ddpm sample.steps:10 x:1/fid"
    assert not math.isnan(table["bpd_ode"][3])
