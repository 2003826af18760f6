"""End to end with real Ray and a real MLflow tracking server on loopback."""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from leaks import files_holding
from orchestrator.tracking import LocalServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "sweeps", "smoke.yaml")
pytestmark = pytest.mark.integration


def orchestrator(args, cwd, env_extra=None, timeout=600):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(env_extra or {})
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def all_runs(client, experiment_name):
    """(parents, training runs, evaluation runs) of an experiment."""
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    training = [r for r in children if r.data.tags.get("stage") == "train"]
    evaluation = [r for r in children if r.data.tags.get("stage") == "evaluate"]
    assert len(training) + len(evaluation) == len(children)
    return parents, training, evaluation


def child_runs(client, experiment_name):
    """(parents, evaluation runs): one evaluation run per trial."""
    parents, _, evaluation = all_runs(client, experiment_name)
    return parents, evaluation


def training_run_of(client, run):
    """The training run an evaluation run links to, checked to carry the same training hash."""
    training = client.get_run(run.data.tags["training_run_id"])
    assert training.data.tags["stage"] == "train"
    assert training.data.tags["training_hash"] == run.data.tags["training_hash"]
    return training


# Credentials a sweep must never write anywhere: the values are unique strings to search for.
SENTINELS = {name: f"sentinel-{name.lower().replace('_', '-')}-5f1c0e9a" for name in (
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY")}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, cache_dir):
    """The smoke sweep run with no MLFLOW_TRACKING_URI (its own server over ./mlflow.db and ./mlartifacts) and
    credentials in the environment: (the finished process, its directory). Every file it wrote, Ray's session
    directory (its logs) included, is searched for the credentials before Ray's directory is removed."""
    workdir = tmp_path_factory.mktemp("smoke")
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's sockets live there: a short path
    try:
        result = orchestrator(["sweep", SMOKE, f"base.eval.cache_dir={cache_dir}", "base.train.log_every=1"],
                              cwd=workdir, env_extra={**SENTINELS, "RAY_TMPDIR": ray_tmp})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert glob.glob(os.path.join(ray_tmp, "ray", "session_*", "logs", "*.log"))  # Ray's logs were searched
        assert files_holding([workdir, ray_tmp, cache_dir], SENTINELS) == []
        assert not any(value in result.stdout + result.stderr for value in SENTINELS.values())
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return result, workdir


def test_smoke_sweep_with_its_own_server(smoke):
    """A later server over the sweep's directory (what `mlflow ui` does) shows every run complete."""
    result, tmp_path = smoke
    assert "fid_reference" in result.stdout  # the summary table
    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "mlartifacts").is_dir()
    check_plain_output(result.stdout + result.stderr, ["ddpm", "ncsn"], loss_reports=2 * 30, workdir=tmp_path)

    reader = LocalServer(str(tmp_path)).start()
    try:
        client = MlflowClient(reader.uri)
        parents, children = child_runs(client, "smoke")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert sorted(r.data.tags["variant"] for r in children) == ["ddpm", "ncsn"]
        for run in children:
            assert run.info.status == "FINISHED"
            assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
            assert run.data.params["sample.sampler"] in ("ancestral", "annealed_langevin")
            assert run.data.params["train.steps"] == "30"
            for metric in ("fid", "fid_reference", "sample_nfe", "sample_seconds", "train_seconds",
                           "bpd_ode", "bpd_ode_stderr", "bpd_ode_nfe", "bpd_elbo", "bpd_elbo_stderr"):
                assert metric in run.data.metrics, metric
            # a bound on the discrete digits (17 levels): above 0, and the ODE's and the ELBO's estimates are
            # on the same scale (bits per discrete value); an untrained model sits far above log2(17) = 4.1
            assert 0 < run.data.metrics["bpd_elbo"] and 0 < run.data.metrics["bpd_ode"] < 100
            assert run.data.tags["bpd.dequantization"].startswith("uniform, (k + u) / 17")
            assert run.data.tags["bpd_ode.rtol"] == "0.01" and run.data.tags["bpd.n"] == "32"
            assert run.data.metrics["fid"] > 0 and run.data.metrics["fid_reference"] >= 0
            assert run.data.tags["fid.extractor"] == "classifier"
            # FID's standard error is recorded beside it; 64 samples of 128-d features are too few for FID-infinity
            assert run.data.metrics["fid_stderr"] > 0 and run.data.metrics["fid_reference_stderr"] > 0
            assert run.data.tags["fid_inf.skipped"].startswith("fid_inf needs at least 640 samples")
            # the training curve and the weights are in the linked training run; its final loss is copied here
            training = training_run_of(client, run)
            assert training.info.status == "FINISHED" and training.data.tags["trials"] == run.data.tags["trial"]
            # in the UI: the variant is a param too, the training run is named after its trial, and the evaluation
            # run's description links the training run
            assert run.data.params["variant"] == run.data.tags["variant"]
            assert training.info.run_name == f"train {run.data.tags['trial']}"
            assert f"(#/experiments/{run.info.experiment_id}/runs/{training.info.run_id})" in \
                run.data.tags["mlflow.note.content"]
            history = client.get_metric_history(training.info.run_id, "train_loss")
            assert [m.step for m in history] == list(range(1, 31))  # base.train.log_every=1
            assert run.data.metrics["train_loss"] == history[-1].value
            assert training.data.params["train.steps"] == "30" and "sample.sampler" not in training.data.params
            assert "ema.pt" in {a.path for a in client.list_artifacts(training.info.run_id)}
            artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert {"samples.png", "config.yaml"} <= artifacts
            png = client.download_artifacts(run.info.run_id, "samples.png", str(tmp_path / run.info.run_id))
            with open(png, "rb") as handle:
                assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
        nfe = {r.data.tags["variant"]: r.data.metrics["sample_nfe"] for r in children}
        assert nfe == {"ddpm": 20.0, "ncsn": 5 * 5 + 1}
        # FID's classifier is trained (or first loaded) by a Ray task or an evaluation, never by the driver (whose
        # host:pid the parent run records); when it was trained here, by the driver's Ray task started ahead
        driver = parents[0].data.tags["driver"]
        [record_path] = glob.glob(str(tmp_path / "ray_results" / "models" / "fid-*" / "fid.json"))
        record = json.loads(open(record_path).read())
        for run in children:
            prepared = run.data.tags["fid.prepared_by"]
            assert prepared == f"{record['prepared_by']} ({record['host']}:{record['pid']})"
            assert not prepared.endswith(f"({driver})") and record["pid"] != int(driver.rsplit(":", 1)[1])
        assert record["prepared_by"] == "ray task" if record["trained"] else record["prepared_by"].startswith(
            "evaluation run ")
    finally:
        reader.stop()


def check_plain_output(output: str, trials: list[str], loss_reports: int, workdir) -> None:
    """What a sweep prints when stdout is not a terminal: no escape codes and none of Ray's, Tune's or MLflow's
    chatter; per trial its start, timestamped phase lines (sample, FID, bits/dim) and its end; the sweep's counts;
    far fewer lines than loss reports; and at the end the command that opens the results once the sweep is gone."""
    assert "\x1b" not in output
    for noise in ("tensorboard", "View run", "View experiment", "repeated", "RAY_DEDUP_LOGS", "Configuration for "
                  "experiment", "View detailed results"):
        assert noise.lower() not in output.lower(), noise
    stamped = [line[9:] for line in output.splitlines() if re.match(r"^\d\d:\d\d:\d\d ", line)]
    for trial in trials:
        mine = [line for line in stamped if line.startswith(f"[{trial}] ")]
        assert mine[0] == f"[{trial}] started (training, then evaluation)", mine
        phases = [line.split()[1] for line in mine]
        assert {"train", "sample", "FID", "bits/dim"} <= set(phases), mine
        assert phases.index("sample") < phases.index("FID") < phases.index("bits/dim")
        assert re.match(rf"\[{trial}\] finished in \d+s: fid [0-9.]+ \(reference [0-9.]+\), bits/dim [0-9.]+, nfe "
                        r"\d+$", mine[-1]), mine[-1]
    sweeps = [line for line in stamped if line.startswith("sweep smoke: ")]
    assert re.match(r"sweep smoke: 2/2 finished, 0 running, 0 failed, 0 pending \(\d+(s|m\d\ds)\)$", sweeps[-1])
    assert len(sweeps) == 2 * len(trials)  # at every start and every end
    assert len([line for line in stamped if " train " in line]) < loss_reports / 5
    assert output.rstrip().splitlines()[-1].startswith(
        f"results: mlflow ui --backend-store-uri sqlite:///{workdir}/mlflow.db --artifacts-destination "
        f"{workdir}/mlartifacts")


def test_nan_trial_fails_while_other_finishes(tmp_path, server, cache_dir):
    sweep = {
        "name": "nan_check",
        "base": yaml.safe_load(open(SMOKE))["base"],
        "variants": {
            "ok": {"process": {"name": "vp", "schedule": "linear", "T": 10}},
            "diverges": {"process": {"name": "vp", "schedule": "linear", "T": 10},
                         "train": {"lr": 1.0e30, "grad_clip": 0.0}},
        },
    }
    sweep["base"]["eval"]["cache_dir"] = cache_dir
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(sweep))
    result = orchestrator(["sweep", str(path)], cwd=tmp_path, env_extra={"MLFLOW_TRACKING_URI": server.uri})
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "FAILED: diverges" in result.stdout
    assert re.search(r"^\d\d:\d\d:\d\d \[diverges\] FAILED after \d+s", result.stdout, re.M), result.stdout
    last = result.stdout.rstrip().splitlines()[-1]  # the configured server's comparison view of the sweep
    assert last.startswith(f"results: {server.uri}/#/experiments/") and "viewStateShareKey=sweep-" in last, last
    assert not (tmp_path / "mlflow.db").exists()  # the configured server was used
    client = MlflowClient(server.uri)
    parents, children = child_runs(client, "nan_check")
    status = {r.data.tags["variant"]: r for r in children}
    assert status["ok"].info.status == "FINISHED"
    assert status["diverges"].info.status == "FAILED"
    assert "diverged" in status["diverges"].data.tags["failure_reason"]
    assert parents[0].info.status == "FAILED"


def test_an_evaluation_starts_once_its_own_model_is_trained(tmp_path, server):
    """No barrier between the trainings and the evaluations: of two models whose trainings differ a lot in length,
    each evaluated with two samplers, the short model's evaluations (the second one a Tune trial of its own) start
    before the long model's training ends; everything finishes."""
    from smallsweep import small_sweep

    path = small_sweep(tmp_path / "order.yaml", "no_barrier", steps=10,
                       variants={"short": {"train": {"steps": 10}}, "long": {"train": {"steps": 300}}},
                       grid={"sample.sampler": ["ancestral", "ddim"]})
    result = orchestrator(["sweep", path], cwd=tmp_path, env_extra={"MLFLOW_TRACKING_URI": server.uri})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(server.uri)
    _, training, evaluation = all_runs(client, "no_barrier")
    assert len(training) == 2 and len(evaluation) == 4
    assert all(r.info.status == "FINISHED" for r in training + evaluation)
    [long] = [r for r in training if r.data.params["train.steps"] == "300"]
    short = [r for r in evaluation if r.data.tags["variant"] == "short"]
    assert len(short) == 2 and all(r.info.start_time < long.info.end_time for r in short), (
        [r.info.start_time for r in short], long.info.end_time)


def test_bad_sweep_file_exits_2_and_writes_nothing(tmp_path, server):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nbase: {sample: {sampler: foo}}\n")
    before = set(os.listdir(tmp_path))
    result = orchestrator(["sweep", str(bad)], cwd=tmp_path, env_extra={"MLFLOW_TRACKING_URI": server.uri})
    assert result.returncode == 2
    assert "sample.sampler" in result.stderr and "'foo'" in result.stderr and "ancestral" in result.stderr
    assert "Traceback" not in result.stderr
    assert set(os.listdir(tmp_path)) == before
    assert MlflowClient(server.uri).get_experiment_by_name("bad") is None


def test_ctrl_c_ends_every_run_killed(tmp_path, server, cache_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=server.uri, PYTHONPATH=ROOT)
    args = [sys.executable, "-m", "orchestrator", "sweep", SMOKE, "name=interrupted", "base.train.steps=100000",
            f"base.eval.cache_dir={cache_dir}"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = MlflowClient(server.uri)
    deadline = time.monotonic() + 180
    running = []
    while time.monotonic() < deadline and len(running) < 2:
        time.sleep(2)
        experiment = client.get_experiment_by_name("interrupted")
        if experiment:
            running = [r for r in client.search_runs([experiment.experiment_id])
                       if "mlflow.parentRunId" in r.data.tags and "train_loss" in r.data.metrics]
    assert len(running) == 2, "both trials should be training"
    proc.send_signal(signal.SIGINT)
    try:
        # In two full-suite runs one Ctrl-C did not stop the driver (not reproduced alone): the driver's watcher
        # (progress.InterruptWatch) then marks the runs KILLED and exits, ORCHESTRATOR_STOP_GRACE = 30 s after it
        output, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError("the driver did not exit within 90 s of Ctrl-C:\n" + output[-5000:])
    assert proc.returncode == 130, output[-3000:]
    parents, training, evaluation = all_runs(client, "interrupted")
    assert [r.info.status for r in parents] == ["KILLED"]
    assert [r.info.status for r in training] == ["KILLED", "KILLED"]
    assert all(r.info.status == "KILLED" for r in evaluation)


WATCHED = """
import sys, time
from orchestrator.progress import InterruptWatch
watch = InterruptWatch(lambda: print("stop called", flush=True), grace=float(sys.argv[1]))
try:  # "ready" inside: a Ctrl-C that arrives while it is being printed is still the graceful stop's
    print("ready", flush=True)
    time.sleep(60)
except KeyboardInterrupt:
    print("graceful stop", flush=True)
    time.sleep(60)  # a graceful stop that never ends (as Ray's shutdown once did)
"""


@pytest.mark.parametrize("presses, grace", [(1, 2.0), (2, 600.0)])
def test_interrupt_watch_ends_a_stuck_stop(tmp_path, presses, grace):
    """progress.InterruptWatch: the first Ctrl-C starts the graceful stop (KeyboardInterrupt in the main thread); if
    that hangs, the watcher calls stop and exits 130 after the grace period, or at once at a second Ctrl-C."""
    proc = subprocess.Popen([sys.executable, "-c", WATCHED, str(grace)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.stdout.readline().strip() == "ready"
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    if presses == 2:
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "graceful stop" in output and "stop called" in output, output
    assert time.monotonic() - started < 10
    assert ("Ctrl-C again" in output) == (presses == 2)


def test_smoke_sweep_report_and_comparison(smoke):
    """The sweep ends with the variants compared (one seed each: the trials' own stderr stands in, and the report
    says so), the report written to reports/<sweep>/ and logged on the parent run with the comparison table (the
    sample grids as an image column), each variant's mean and interval as parent metrics, and the MLflow UI's
    comparison view as an experiment tag."""
    import json

    result, workdir = smoke
    assert "verdicts at 95%:" in result.stdout and "per-trial stderr stands in" in result.stdout
    assert "one seed: the trial's own standard error stands in" in result.stdout
    report_dir = workdir / "reports" / "smoke"
    html_text = (report_dir / "report.html").read_text()
    assert "src='http" not in html_text and 'src="http' not in html_text  # self-contained
    assert "fid_inf not measured: fid_inf needs at least 640 samples" in (report_dir / "report.md").read_text()
    reader = LocalServer(str(workdir)).start()
    try:
        client = MlflowClient(reader.uri)
        experiment = client.get_experiment_by_name("smoke")
        parents, children = child_runs(client, "smoke")
        parent = parents[0]
        artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
        assert {"report.html", "report.md", "comparison.json", "verdicts.json", "report_files"} <= artifacts
        table = json.loads(open(client.download_artifacts(parent.info.run_id, "comparison.json",
                                                          str(workdir / "table"))).read())
        rows = [dict(zip(table["columns"], row)) for row in table["data"]]
        assert [row["variant"] for row in rows] == ["ddpm", "ncsn"]
        assert all(row["samples"]["type"] == "image" for row in rows)
        for run in children:  # one seed: the variant's mean is the trial's value, its interval 1.96 stderr wide
            variant, fid, stderr = run.data.tags["variant"], run.data.metrics["fid"], run.data.metrics["fid_stderr"]
            assert parent.data.metrics[f"{variant}/fid"] == pytest.approx(fid)
            assert parent.data.metrics[f"{variant}/fid_high"] - fid == pytest.approx(1.959964 * stderr, rel=1e-5)
            row = next(r for r in rows if r["variant"] == variant)
            assert row["fid_low"] == pytest.approx(fid - 1.959964 * stderr, rel=1e-5)
        verdicts = json.loads(open(client.download_artifacts(parent.info.run_id, "verdicts.json",
                                                             str(workdir / "table"))).read())
        assert ["ddpm", "ncsn", "fid"] == verdicts["data"][0][:3]
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
        view = json.loads(experiment.tags[f"mlflow.sharedViewState.sweep-{parent.info.run_id[:12]}"])
        assert "metrics.`fid_stderr`" in view["selectedColumns"] and parent.info.run_id in view["searchFilter"]
    finally:
        reader.stop()


def test_report_command_makes_the_report_again_without_a_server(smoke, tmp_path):
    """`orchestrator report NAME` after the sweep (its server gone) serves the store for the call and writes the
    report again; a name that is no sweep exits 2 naming it and the sweeps there, with no traceback."""
    result, workdir = smoke
    html_path = workdir / "reports" / "smoke" / "report.html"
    before = html_path.stat().st_mtime_ns
    again = orchestrator(["report", "smoke"], cwd=workdir)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "verdicts at 95%:" in again.stdout and f"report: {html_path}" in again.stdout
    assert html_path.stat().st_mtime_ns > before
    from diffusion.errors import ConfigError
    from orchestrator.collect import find_parent

    with pytest.raises(ConfigError, match=r"report: invalid value 'no-such-sweep'; accepted: a sweep's name \(smoke\)"):
        find_parent(MlflowClient(f"sqlite:///{workdir}/mlflow.db"), "no-such-sweep")  # what the command says, exit 2
    empty = orchestrator(["report", "smoke"], cwd=tmp_path)  # no store in this directory
    assert empty.returncode == 2 and "mlflow.db is missing" in empty.stderr and "Traceback" not in empty.stderr


def test_report_renders_in_chromium(smoke):
    """report.html in headless Chromium: every image (plots, sample grids) loads from the page itself, the variant
    table lists both variants and the verdicts are in the DOM."""
    from browser import IMAGES, chromium

    _, workdir = smoke
    browser = chromium()
    try:
        browser.get((workdir / "reports" / "smoke" / "report.html").as_uri())
        images = browser.execute_script(IMAGES)
        assert {alt for alt, *_ in images} >= {"metrics.png", "train_loss.png", "samples of ddpm", "samples of ncsn"}
        for alt, complete, width, src in images:
            assert complete and width > 0 and src.startswith("data:image/png"), (alt, width, src)
        rows = browser.find_elements("css selector", "#variants tbody tr")
        assert [r.find_elements("tag name", "td")[0].text for r in rows] == ["ddpm", "ncsn"]
        assert "(n=1)" in rows[0].text
        assert len(browser.find_elements("css selector", "#verdicts li")) >= 1
        parent_id = browser.find_element("id", "parent-run").text
        assert browser.find_element("id", "comparison-view").get_attribute("href").endswith(
            f"viewStateShareKey=sweep-{parent_id[:12]}")
    finally:
        browser.quit()


def test_mlflow_ui_shows_samples_fid_and_the_comparison(smoke):
    """`mlflow ui` over the finished sweep, in headless Chromium: an evaluation run's page shows its fid value, its
    artifact view shows the sample grid (the image loads, as wide as the logged PNG), and the sweep's comparison
    view lists the trials with fid and fid_stderr as columns."""
    from PIL import Image

    from browser import chromium, wait_for
    from orchestrator.parentrun import view_url

    _, workdir = smoke
    reader = LocalServer(str(workdir)).start()
    browser = chromium(width=3000)  # the runs table draws only the columns in sight
    try:
        client = MlflowClient(reader.uri)
        parents, children = child_runs(client, "smoke")
        run = children[0]
        fid = run.data.metrics["fid"]
        base = f"{reader.uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        browser.get(base)
        body = wait_for(lambda: (lambda t: t if "fid_reference" in t else "")(
            browser.find_element("tag name", "body").text), what="the run page's metrics")
        assert f"{fid:.6f}"[:6] in body, body[:2000]
        png = client.download_artifacts(run.info.run_id, "samples.png", str(workdir / "ui"))
        width = Image.open(png).size[0]
        browser.get(base + "/artifacts/samples.png")
        shown = wait_for(lambda: [i for i in browser.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.src.slice(0, 5)])")
            if i[0] and i[1] == width and i[2] == "blob:"], what="the sample grid in the artifact view")
        assert shown
        browser.get(view_url(reader.uri, run.info.experiment_id, parents[0].info.run_id))
        table = wait_for(lambda: (lambda t: t if "fid_stderr" in t and "ncsn" in t else "")(
            browser.find_element("tag name", "body").text), what="the comparison view")
        assert "ddpm" in table and "fid_reference" in table and "2 matching runs" in table
    finally:
        browser.quit()
        reader.stop()


# The notebook API on the same finished smoke sweep (tests/notebook_checks.py): one sweep for both.
@pytest.fixture(scope="module")
def finished(smoke):
    return smoke[1]


from notebook_checks import (in_sweep_dir, test_errors_name_the_bad_value,  # noqa: E402,F401 - collected here
                             test_load_model_from_run_and_cache_path_and_the_evaluations_samples,
                             test_readme_notebook_section_runs_with_no_server, test_results_are_what_mlflow_recorded)
