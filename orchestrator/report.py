"""A sweep's report: the variant table (mean and 95% interval over seeds, FID over its real-data floor), the pairwise
verdicts, plots chosen by what the sweep varies, the sample grids side by side, failed and killed trials with their
reasons and a link to every run.

``build`` turns ``SweepResults`` (``orchestrator.collect``) into a ``SweepReport``: ``report.md`` (with its plots in
``report_files/``), a self-contained ``report.html`` (images embedded, nothing fetched), the terminal summary and
the comparison tables. ``publish`` writes the files to ``reports/<sweep>/`` in the working directory and logs them,
the per-variant metrics and the comparison table (``comparison.json``, sample grids as an image column) on the
parent run."""
from __future__ import annotations

import base64
import html
import io
import math
import os
from dataclasses import dataclass, field
from typing import Optional

from diffusion.storage import write_atomic

from .collect import SweepResults
from .compare import Interval, Verdict, VariantSummary, aggregate, compare, ranked_metrics
from .parentrun import view_url
from .plots import make_plots

COMPARISON_TABLE = "comparison.json"
VERDICT_TABLE = "verdicts.json"
UI_PORT = 5000  # where `mlflow ui` listens by default: the report's run links
FILE_MODE = 0o644  # a report is for reading: as a file written with the usual umask
DIGITS = {"kid": 4, "bpd_ode": 3, "bpd_elbo": 3}


@dataclass
class SweepReport:
    results: SweepResults
    variants: list[VariantSummary]
    verdicts: list[Verdict]
    plots: dict[str, bytes] = field(default_factory=dict)  # file name -> PNG
    markdown: str = ""
    html: str = ""
    summary: str = ""  # what the terminal shows at the end of a sweep
    path: str = ""  # of report.html, once written

    @property
    def view(self) -> str:
        """The MLflow UI's comparison view of this sweep run, as a path after the server's address."""
        return view_url("", self.results.experiment_id, self.results.parent_run_id)


def build(results: SweepResults, plots: bool = True) -> SweepReport:
    variants = aggregate(results.records)
    report = SweepReport(results, variants, compare(variants))
    if plots:
        report.plots = make_plots(results, variants)
    report.markdown = render_markdown(report)
    report.html = render_html(report)
    report.summary = render_summary(report)
    return report


# ------------------------------------------------------------------------------------------------------------------
# numbers as text


def fmt(value: Optional[float], metric: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{DIGITS.get(metric, 3)}f}"


def fmt_interval(found: Optional[Interval], metric: str) -> str:
    """``3.289 ± 2.64 (2)``: the mean, the interval's half-width and the number of seeds."""
    if found is None:
        return "-"
    if found.half_width is None:
        return f"{fmt(found.mean, metric)} (n={found.n}, no interval)"
    mark = "" if found.n > 1 else "*"
    return f"{fmt(found.mean, metric)} ± {fmt(found.half_width, metric)}{mark} (n={found.n})"


def metric_columns(report: SweepReport) -> list[str]:
    return ranked_metrics({m for v in report.variants for m in v.metrics}) + (
        ["fid_over_floor"] if any("fid_over_floor" in v.metrics for v in report.variants) else [])


def variant_rows(report: SweepReport) -> tuple[list[str], list[list[str]]]:
    columns = metric_columns(report)
    header = ["variant", "seeds", *columns, "train min/trial", "eval min/trial"]
    rows = []
    for variant in report.variants:
        train = [t.train_seconds for t in variant.trials if t.train_seconds is not None]
        evaluate = [t.eval_seconds for t in variant.trials if t.eval_seconds is not None]
        rows.append([variant.variant, ",".join(str(s) for s in variant.seeds),
                     *[fmt_interval(variant.metrics.get(c), c) for c in columns],
                     fmt(sum(train) / 60 / len(train) if train else None, "min"),
                     fmt(sum(evaluate) / 60 / len(evaluate) if evaluate else None, "min")])
    return header, rows


def trial_rows(results: SweepResults) -> tuple[list[str], list[list[str]]]:
    axes = [a for a in results.varying if a != "variant"]
    stopping = any(r.status == "STOPPED" for r in results.records)  # then the steps each training used are shown
    header = ["trial", "variant", *axes, "status", *(["steps"] if stopping else []), "fid", "fid_stderr",
              "fid_reference", "kid", "bpd_ode", "bpd_elbo", "train min", "eval min"]
    rows = []
    for r in results.records:
        m = r.metrics
        steps = [f"{m['train_steps']:.0f}" if "train_steps" in m else r.params.get("train.steps", "-")] if stopping else []
        rows.append([r.name, r.variant, *[str(r.axes.get(a, "-")) for a in axes], r.status, *steps, fmt(m.get("fid")),
                     fmt(m.get("fid_stderr")), fmt(m.get("fid_reference")), fmt(m.get("kid"), "kid"),
                     fmt(m.get("bpd_ode"), "bpd_ode"), fmt(m.get("bpd_elbo"), "bpd_elbo"),
                     fmt(r.train_seconds / 60 if r.train_seconds is not None else None, "min"),
                     fmt(r.eval_seconds / 60 if r.eval_seconds is not None else None, "min")])
    return header, rows


def text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]


def notes(report: SweepReport) -> list[str]:
    """What a reader must know to read the intervals and verdicts right."""
    out = ["Intervals: 95%, a t interval over the seeds of each variant (training and evaluation noise)."]
    if any(i.n == 1 for v in report.variants for i in v.metrics.values()):
        out.append("* one seed: the trial's own standard error stands in (evaluation noise only, not training's).")
    if any("fid_over_floor" in v.metrics for v in report.variants):
        out.append("fid_over_floor: FID over fid_reference, the FID of held-out real data (1 is as good as real data).")
    skipped = {}
    for record in report.results.records:
        for metric, reason in record.skipped.items():
            skipped.setdefault(metric, reason)
    out += [f"{metric} not measured: {reason}" for metric, reason in sorted(skipped.items())]
    if report.verdicts:
        out.append("Verdicts: per pair and metric at 95% each, not corrected for the number of comparisons; lower is "
                   "better except for PSNR and SSIM.")
    return out


def failures(results: SweepResults) -> list[str]:
    return [f"{r.status}: {r.name}: {r.error or 'no reason recorded'}" for r in results.records
            if r.status not in ("FINISHED", "STOPPED")]


def stopped(results: SweepResults) -> list[str]:
    """The trials the sweep's scheduler stopped: where, and the compute they used."""
    return [f"{r.name}: {r.error}" + (f" ({r.train_seconds / 60:.2f} min of training)" if r.train_seconds else "")
            for r in results.records if r.status == "STOPPED"]


def run_link(results: SweepResults, run_id: str) -> str:
    return f"http://127.0.0.1:{UI_PORT}/#/experiments/{results.experiment_id}/runs/{run_id}"


def comparison_link(results: SweepResults) -> str:
    """The MLflow UI's view of this sweep run: its trials with their metrics side by side."""
    return view_url(f"http://127.0.0.1:{UI_PORT}", results.experiment_id, results.parent_run_id)


# ------------------------------------------------------------------------------------------------------------------
# the terminal's summary


def render_summary(report: SweepReport) -> str:
    results = report.results
    lines = ["", f"sweep {results.sweep}: {len(results.records)} trial(s), parent run {results.parent_run_id}"]
    lines += text_table(*trial_rows(results))
    if report.variants:
        lines += ["", "variants (mean ± 95% interval half-width over seeds; n = seeds):"]
        lines += text_table(*variant_rows(report))
    if report.verdicts:
        lines += ["", "verdicts at 95%:"] + [f"  {v.sentence()}" for v in report.verdicts]
    lines += ["", *notes(report)]
    if stopped(results):
        lines += ["stopped early by the scheduler (not evaluated):", *[f"  {s}" for s in stopped(results)]]
    lines += failures(results)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# markdown and html


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    escape = lambda cell: str(cell).replace("|", "\\|")  # noqa: E731
    return ["| " + " | ".join(map(escape, header)) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(map(escape, row)) + " |" for row in rows]]


def render_markdown(report: SweepReport) -> str:
    results = report.results
    lines = [f"# Sweep `{results.sweep}`", "",
             f"Parent run `{results.parent_run_id}` ({results.status}); {len(results.records)} of {results.planned} "
             f"trial(s) recorded; varying: {', '.join(results.varying) or 'nothing'}.", ""]
    if report.variants:
        lines += ["## Variants", "", *_md_table(*variant_rows(report)), ""]
    if report.verdicts:
        lines += ["## Verdicts", "", *[f"- {v.sentence()}" for v in report.verdicts], ""]
    lines += [f"_{n}_  " for n in notes(report)] + [""]
    for name in report.plots:
        lines += [f"![{name}](report_files/{name})", ""]
    if results.images:
        lines += ["## Samples", ""] + [f"![{name}](report_files/samples-{i}.png) `{name}`  " for i, name in
                                       enumerate(results.images)] + [""]
    lines += ["## Trials", "", *_md_table(*trial_rows(results)), ""]
    if stopped(results):
        lines += ["## Stopped early by the scheduler", "", *[f"- {f}" for f in stopped(results)], ""]
    if failures(results):
        lines += ["## Failed and killed trials", "", *[f"- {f}" for f in failures(results)], ""]
    lines += ["## Runs", "", f"Run `mlflow ui` in the sweep's directory (port {UI_PORT}) to open these:", "",
              f"- [all trials, metrics side by side]({comparison_link(results)})"]
    lines += [f"- [{r.name}]({run_link(results, r.run_id)})" for r in results.records if r.run_id]
    return "\n".join(lines) + "\n"


def markdown_files(report: SweepReport) -> dict[str, bytes]:
    """The images ``report.md`` links to, by their path relative to it."""
    files = {f"report_files/{name}": png for name, png in report.plots.items()}
    files.update({f"report_files/samples-{i}.png": png for i, png in enumerate(report.results.images.values())})
    return files


STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:14px}th{background:#f3f3f3}
.better{color:#1a7f37}.worse{color:#b42318}.grids{display:flex;flex-wrap:wrap;gap:16px}
figure{margin:0}figcaption{font-family:monospace;font-size:13px}.note{color:#555;font-size:13px}
img.grid{image-rendering:pixelated;max-width:320px}img.plot{max-width:100%}"""


def _html_table(header: list[str], rows: list[list[str]], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_html(report: SweepReport) -> str:
    results = report.results
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>sweep {esc(results.sweep)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>Sweep <code>{esc(results.sweep)}</code></h1>",
             f"<p>Parent run <code id='parent-run'>{esc(results.parent_run_id)}</code> ({esc(results.status)}); "
             f"{len(results.records)} of {results.planned} trial(s) recorded; varying: "
             f"{esc(', '.join(results.varying) or 'nothing')}.</p>"]
    if report.variants:
        parts += ["<h2>Variants</h2>", _html_table(*variant_rows(report), "variants")]
    if report.verdicts:
        parts.append("<h2>Verdicts</h2><ul id='verdicts'>")
        parts += [f"<li class='{v.outcome.split()[0]}'>{esc(v.sentence())}</li>" for v in report.verdicts]
        parts.append("</ul>")
    parts += [f"<p class='note'>{esc(n)}</p>" for n in notes(report)]
    if report.plots:
        parts.append("<h2>Plots</h2>")
        parts += [f"<p><img class='plot' alt='{esc(name)}' src='{_data_uri(png)}'></p>" for name, png in
                  report.plots.items()]
    if results.images:
        parts.append("<h2>Samples</h2><div class='grids'>")
        parts += [f"<figure><img class='grid' alt='samples of {esc(name)}' src='{_data_uri(png)}'>"
                  f"<figcaption>{esc(name)}</figcaption></figure>" for name, png in results.images.items()]
        parts.append("</div>")
    parts += ["<h2>Trials</h2>", _html_table(*trial_rows(results), "trials")]
    if stopped(results):
        parts.append("<h2>Stopped early by the scheduler</h2><ul id='stopped'>")
        parts += [f"<li>{esc(f)}</li>" for f in stopped(results)]
        parts.append("</ul>")
    if failures(results):
        parts.append("<h2>Failed and killed trials</h2><ul id='failures'>")
        parts += [f"<li>{esc(f)}</li>" for f in failures(results)]
        parts.append("</ul>")
    parts.append(f"<h2>Runs</h2><p>Run <code>mlflow ui</code> in the sweep's directory (port {UI_PORT}) to open "
                 f"these:</p><ul><li><a id='comparison-view' href='{esc(comparison_link(results))}'>all trials, "
                 "metrics side by side</a></li>")
    parts += [f"<li><a href='{esc(run_link(results, r.run_id))}'>{esc(r.name)}</a></li>" for r in results.records
              if r.run_id]
    parts.append("</ul></body></html>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------------------
# written and logged


def write(report: SweepReport, directory: str) -> str:
    """``report.html``, ``report.md`` and its ``report_files/`` written (atomically, file by file) to ``directory``;
    returns the path of ``report.html``."""
    os.makedirs(os.path.join(directory, "report_files"), exist_ok=True)
    for relative, content in markdown_files(report).items():
        write_atomic(os.path.join(directory, relative), lambda handle, c=content: handle.write(c), mode=FILE_MODE)
    write_atomic(os.path.join(directory, "report.md"), lambda handle: handle.write(report.markdown.encode()),
                 mode=FILE_MODE)
    path = os.path.join(directory, "report.html")
    write_atomic(path, lambda handle: handle.write(report.html.encode()), mode=FILE_MODE)
    return path


def report_directory(workdir: str, sweep: str) -> str:
    return os.path.join(workdir, "reports", sweep)


def comparison_table(report: SweepReport) -> dict:
    """The parent run's comparison table: a row per variant, each metric's mean, interval and seeds, and the first
    trial's sample grid as an image column (the UI's artifact view compares them)."""
    from PIL import Image

    columns = metric_columns(report)
    table: dict[str, list] = {"variant": [], "seeds": []}
    for metric in columns:
        for suffix in ("", "_low", "_high"):
            table[metric + suffix] = []
    table["samples"] = []
    for variant in report.variants:
        table["variant"].append(variant.variant)
        table["seeds"].append(",".join(str(s) for s in variant.seeds))
        for metric in columns:
            found = variant.metrics.get(metric)
            table[metric].append(found.mean if found else None)
            table[metric + "_low"].append(found.low if found else None)
            table[metric + "_high"].append(found.high if found else None)
        png = next((report.results.images[t.name] for t in variant.trials if t.name in report.results.images), None)
        table["samples"].append(Image.open(io.BytesIO(png)).convert("RGB") if png else None)
    if all(image is None for image in table["samples"]):
        del table["samples"]
    return table


def verdict_table(report: SweepReport) -> dict:
    fields = ("a", "b", "metric", "outcome", "difference", "low", "high", "relative", "effect", "p", "n", "method")
    return {name: [getattr(v, name) for v in report.verdicts] for name in fields}


def metric_key(variant: str, name: str) -> str:
    """An MLflow metric key for a variant's value (keys take letters, digits, ``_ - . / :`` and spaces)."""
    safe = variant.replace("=", ":").replace(",", " ")
    return f"{safe}/{name}"


def log_to_parent(client, report: SweepReport, files_directory: str, tables: bool = True) -> None:
    """On the parent run: each variant's mean and interval bounds as metrics (``<variant>/fid``,
    ``<variant>/fid_low``, ...), the comparison and verdict tables (``tables``: MLflow appends to an existing table,
    so a regenerated report logs them only when absent) and the report's files."""
    from mlflow.entities import Metric

    parent = report.results.parent_run_id
    metrics = []
    for variant in report.variants:
        for name, found in variant.metrics.items():
            metrics.append(Metric(metric_key(variant.variant, name), found.mean, 0, 0))
            if found.low is not None:
                metrics.append(Metric(metric_key(variant.variant, name + "_low"), found.low, 0, 0))
                metrics.append(Metric(metric_key(variant.variant, name + "_high"), found.high, 0, 0))
    for start in range(0, len(metrics), 1000):
        client.log_batch(parent, metrics=metrics[start:start + 1000])
    present = {a.path for a in client.list_artifacts(parent)}
    if tables and report.variants and COMPARISON_TABLE not in present:
        client.log_table(parent, data=comparison_table(report), artifact_file=COMPARISON_TABLE)
    if tables and report.verdicts and VERDICT_TABLE not in present:
        client.log_table(parent, data=verdict_table(report), artifact_file=VERDICT_TABLE)
    client.log_artifacts(parent, files_directory)


def publish(client, report: SweepReport, workdir: str) -> str:
    """The report written to ``reports/<sweep>/`` under ``workdir`` and logged on the parent run; returns the path
    of ``report.html``."""
    directory = report_directory(workdir, report.results.sweep)
    path = write(report, directory)
    log_to_parent(client, report, directory)
    return path


def regenerate(name_or_id: str, workdir: str = ".") -> SweepReport:
    """``orchestrator report``: the report of a finished or partial sweep (its name: the latest run; or a parent run
    id) made again from MLflow ($MLFLOW_TRACKING_URI, else the local store of ``workdir``, served for the call),
    written to ``reports/<sweep>/`` and logged on the parent run. ConfigError when there is nothing to read."""
    from mlflow.tracking import MlflowClient

    from diffusion.errors import ConfigError

    from .collect import collect, find_parent
    from .tracking import check_tracking_uri_credentials, tracking_server

    workdir = os.path.abspath(workdir)
    check_tracking_uri_credentials(os.environ.get("MLFLOW_TRACKING_URI"))
    if not os.environ.get("MLFLOW_TRACKING_URI") and not os.path.exists(os.path.join(workdir, "mlflow.db")):
        raise ConfigError("report", name_or_id, "a sweep run in this directory, or MLFLOW_TRACKING_URI set",
                          detail=f"no MLflow store here ({os.path.join(workdir, 'mlflow.db')} is missing)")
    with tracking_server(workdir, log_path=os.path.join(workdir, "mlflow-server.log")) as uri:
        client = MlflowClient(uri)
        parent = find_parent(client, name_or_id)
        results = collect(client, parent.info.run_id)
        report = build(results)
        report.path = publish(client, report, workdir)
    return report
