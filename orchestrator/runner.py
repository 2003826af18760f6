"""Run a sweep on Ray Tune and record it in MLflow: one parent run, one child run per trial."""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

from .sweepfile import Sweep, Trial
from .tracking import end_unfinished_runs, tracking_server, worker_env
from .trial import FAILURE_TAG, TrialContext, run_trial

EXIT_OK, EXIT_TRIAL_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass
class TrialSummary:
    name: str
    axes: dict
    status: str  # FINISHED, FAILED or KILLED
    fid: Optional[float] = None
    fid_reference: Optional[float] = None
    kid: Optional[float] = None
    bpd_ode: Optional[float] = None
    bpd_elbo: Optional[float] = None
    minutes: Optional[float] = None
    error: str = ""


def describe(sweep: Sweep) -> str:
    """The trial list that ``validate`` and ``sweep --dry-run`` print."""
    lines = [f"sweep {sweep.name}: {len(sweep.trials)} trial(s); varying: {', '.join(sweep.varying) or 'nothing'}"]
    for trial in sweep.trials:
        res = trial.config.resources
        lines.append(f"  {trial.name:<40} cpu={res.cpu:g} gpu={res.gpu:g}  {_trial_line(trial)}")
    return "\n".join(lines)


def _trial_line(trial: Trial) -> str:
    c = trial.config
    return (
        f"data={c.data.name} process={c.process.name}/{c.process.schedule}/T={c.process.T} "
        f"param={c.model.parameterization} loss={c.loss.weighting} sampler={c.sample.sampler} "
        f"steps={c.train.steps} seed={c.seed}"
    )


def run_sweep(sweep: Sweep, workdir: str = ".") -> int:
    """Run every trial; print a summary table; return the exit status (0 all finished, 1 a trial
    failed, 130 interrupted)."""
    import ray
    from mlflow.tracking import MlflowClient
    from ray import tune

    workdir = os.path.abspath(workdir)
    started = time.time()
    with tracking_server(workdir, log_path=os.path.join(workdir, "mlflow-server.log")) as uri:
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(sweep.name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(sweep.name)
        parent = client.create_run(
            experiment_id,
            run_name=f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            tags={"sweep": sweep.name, "sweep_digest": sweep.digest(), "trials": str(len(sweep.trials)),
                  "varying": ",".join(sweep.varying)},
        )
        parent_id = parent.info.run_id
        client.log_dict(parent_id, sweep.source, "sweep.yaml")
        context = TrialContext(uri, experiment_id, parent_id, sweep.name)
        print(f"MLflow: experiment '{sweep.name}', parent run {parent_id} at {uri}", flush=True)

        status, results = "FINISHED", None
        try:
            prepare_extractors(sweep)
            os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C raises KeyboardInterrupt here
            os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
            ray.init(
                include_dashboard=False,
                runtime_env={"env_vars": worker_env(uri)},
                log_to_driver=True,
                configure_logging=True,
                logging_level="WARNING",
            )
            trainable = tune.with_resources(
                run_trial,
                lambda config: {"cpu": config["trial"]["config"]["resources"]["cpu"],
                                "gpu": config["trial"]["config"]["resources"]["gpu"]},
            )
            tuner = tune.Tuner(
                trainable,
                param_space={
                    "trial": tune.grid_search([t.as_dict() for t in sweep.trials]),
                    "context": dataclasses.asdict(context),
                },
                tune_config=tune.TuneConfig(
                    max_concurrent_trials=sweep.max_concurrent,
                    trial_name_creator=lambda t: t.config["trial"]["name"],
                    trial_dirname_creator=lambda t: t.config["trial"]["name"],
                ),
                run_config=tune.RunConfig(
                    name=f"{sweep.name}-{parent_id[:8]}",
                    storage_path=_storage_path(sweep.storage, workdir),
                    failure_config=tune.FailureConfig(max_failures=0),
                    callbacks=[_progress_printer(tune, len(sweep.trials))],
                    verbose=0,
                ),
            )
            results = tuner.fit()
        except KeyboardInterrupt:
            status = "KILLED"
            print("\ninterrupted: stopping every trial", flush=True)
        finally:
            if ray.is_initialized():
                ray.shutdown()
            killed = end_unfinished_runs(client, experiment_id, parent_id, "KILLED")
        summaries = _summaries(client, experiment_id, parent_id, sweep)
        if status != "KILLED" and any(s.status != "FINISHED" for s in summaries):
            status = "FAILED"
        client.set_terminated(parent_id, status=status)
    print(summary_table(sweep, summaries, time.time() - started))
    if killed:
        print(f"{len(killed)} run(s) were still running and are marked KILLED")
    return {"FINISHED": EXIT_OK, "FAILED": EXIT_TRIAL_FAILED}.get(status, EXIT_INTERRUPTED)


def prepare_extractors(sweep: Sweep) -> None:
    """Train (or load) each FID feature extractor the sweep needs once, in the driver, and extract the
    reference split's features into the cache, so that concurrent trials load both from the cache
    instead of each computing its own copy."""
    import torch

    from diffusion.data import load_dataset
    from diffusion.metrics import get_extractor, reference_features

    seen = set()
    for trial in sweep.trials:
        cfg = trial.config
        key = (repr(cfg.data), cfg.eval.extractor, cfg.eval.classifier_steps, cfg.eval.cache_dir)
        if not cfg.eval.fid or key in seen:
            continue
        seen.add(key)
        dataset = load_dataset(cfg.data)
        name, extract, info = get_extractor(cfg.eval.extractor, dataset, cfg.eval, torch.device("cpu"))
        reference_features(dataset, cfg.eval.reference_split, name, extract, info, cfg.eval.cache_dir)
        if name == "classifier":
            origin = "loaded from cache" if info.get("loaded_from_cache") else "trained"
            print(f"FID features for {cfg.data.name}: classifier {origin}, test accuracy {info['accuracy']:.4f}",
                  flush=True)


def _progress_printer(tune, total: int):
    """One line per reported result and per finished trial (instead of Tune's large tables)."""

    class ProgressPrinter(tune.Callback):
        def __init__(self):
            self.done = 0

        def on_trial_start(self, iteration, trials, trial, **info):
            print(f"[{trial.config['trial']['name']}] started", flush=True)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            name = trial.config["trial"]["name"]
            if "fid" in result:
                print(f"[{name}] fid {result['fid']:.3f} (reference {result['fid_reference']:.3f}), "
                      f"nfe {result['sample_nfe']:.0f}", flush=True)
            elif "train_loss" in result:
                print(f"[{name}] step {result['step']} train_loss {result['train_loss']:.4f}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            print(f"[{trial.config['trial']['name']}] finished ({self.done}/{total})", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            print(f"[{trial.config['trial']['name']}] FAILED ({self.done}/{total})", flush=True)

    return ProgressPrinter()


def _storage_path(storage: str, workdir: str) -> str:
    return storage if "://" in storage else os.path.join(workdir, storage)


def _summaries(client, experiment_id: str, parent_id: str, sweep: Sweep) -> list[TrialSummary]:
    """Each trial's outcome as MLflow recorded it (a trial with no run never started: KILLED)."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                              max_results=10_000)
    by_name = {run.data.tags.get("trial"): run for run in runs}
    out = []
    for trial in sweep.trials:
        run = by_name.get(trial.name)
        if run is None:
            out.append(TrialSummary(trial.name, trial.axes, "KILLED", error="never started"))
            continue
        metrics = run.data.metrics
        minutes = (run.info.end_time - run.info.start_time) / 60000 if run.info.end_time else None
        out.append(TrialSummary(
            trial.name, trial.axes, run.info.status, metrics.get("fid"), metrics.get("fid_reference"),
            metrics.get("kid"), metrics.get("bpd_ode"), metrics.get("bpd_elbo"), minutes,
            run.data.tags.get(FAILURE_TAG, ""),
        ))
    return out


def summary_table(sweep: Sweep, summaries: list[TrialSummary], seconds: float) -> str:
    axes = [a for a in sweep.varying if a != "variant"]
    trial_by_name = {t.name: t for t in sweep.trials}
    header = ["trial", "variant", *axes, "status", "fid", "fid_reference", "kid", "bpd_ode", "bpd_elbo", "minutes"]
    rows = []
    for s in summaries:
        trial = trial_by_name[s.name]
        rows.append([s.name, trial.variant, *[str(s.axes.get(a)) for a in axes], s.status,
                     _number(s.fid), _number(s.fid_reference), _number(s.kid, 4), _number(s.bpd_ode, 2),
                     _number(s.bpd_elbo, 2), _number(s.minutes, 1)])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["", f"sweep {sweep.name}: {len(summaries)} trial(s) in {seconds / 60:.1f} min"]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    failed = [s for s in summaries if s.status != "FINISHED"]
    for s in failed:
        lines.append(f"{s.status}: {s.name}: {s.error or 'no reason recorded'}")
    return "\n".join(lines)


def _number(value: Optional[float], digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"
