"""Run a sweep on Ray Tune and record it in MLflow: one parent run, one child run per trial."""
from __future__ import annotations

import dataclasses
import math
import os
import select
import signal
import threading
import time
from dataclasses import dataclass
from typing import Optional

from diffusion.config import training_key
from diffusion.errors import ConfigError

from .cache import ModelCache, filesystem, is_uri, local_path
from .sweepfile import Sweep, Trial
from .tracking import ACTIVE_SERVERS, end_unfinished_runs, tracking_server, worker_env
from .trial import FAILURE_TAG, STAGE_TAG, TRAIN, TrialContext, find_run, record_unevaluated, run_task

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


@dataclass
class TrainingGroup:
    """The trials that share one training key: one model, trained once (or taken from the cache)."""

    key: str
    trials: list[Trial]
    cached: bool  # a finished model with this key is in the cache and is reused


def plan(sweep: Sweep, cache: ModelCache, use_cache: bool = True) -> list[TrainingGroup]:
    """Group the sweep's trials by training key, in the order of their first trial."""
    groups: dict[str, list[Trial]] = {}
    for trial in sweep.trials:
        groups.setdefault(training_key(trial.config), []).append(trial)
    return [TrainingGroup(key, trials, use_cache and cache.has(key)) for key, trials in groups.items()]


def model_cache(sweep: Sweep, workdir: str = ".") -> ModelCache:
    """The sweep's model cache: ``<storage>/models``, next to Tune's state (a directory or an object store)."""
    storage = _storage_path(sweep.storage, os.path.abspath(workdir))
    cache = ModelCache(f"{storage.rstrip('/')}/models" if is_uri(storage) else os.path.join(storage, "models"))
    cache.check()
    return cache


def plan_line(groups: list[TrainingGroup], cache: ModelCache) -> str:
    cached = sum(g.cached for g in groups)
    evaluations = sum(len(g.trials) for g in groups)
    return (f"training: {len(groups) - cached} model(s) to train, {cached} reused from the cache ({cache.root}); "
            f"{evaluations} evaluation(s)")


def describe(sweep: Sweep, groups: Optional[list[TrainingGroup]] = None, cache: Optional[ModelCache] = None) -> str:
    """The trial list that ``validate`` and ``sweep --dry-run`` print (with the training plan when given)."""
    lines = [f"sweep {sweep.name}: {len(sweep.trials)} trial(s); varying: {', '.join(sweep.varying) or 'nothing'}"]
    keys = {t.name: g.key for g in groups or [] for t in g.trials}
    for trial in sweep.trials:
        res = trial.config.resources
        model = f"  model={keys[trial.name][:8]}" if trial.name in keys else ""
        lines.append(f"  {trial.name:<40} cpu={res.cpu:g} gpu={res.gpu:g}  {_trial_line(trial)}{model}")
    if groups is not None and cache is not None:
        lines.append(plan_line(groups, cache))
    return "\n".join(lines)


def _trial_line(trial: Trial) -> str:
    c = trial.config
    if c.process.name in ("naive", "cold"):  # a degradation and an x0-predicting network with the squared error
        kind = "naive" if c.process.name == "naive" else f"cold/{c.process.degradation}"
        model = f"process={kind}/T={c.process.T} param=x0 loss=mse"
    else:
        model = (f"process={c.process.name}/{c.process.schedule}/T={c.process.T} "
                 f"param={c.model.parameterization} loss={c.loss.weighting}")
        if c.model.latent:
            model += f" latent={c.model.latent_channels}ch/f{c.model.latent_factor}"
    if c.eval.inverse:
        model += f" inverse={'+'.join(c.eval.inverse)}/{c.eval.inverse_solver}"
    return f"data={c.data.name} {model} sampler={c.sample.sampler} steps={c.train.steps} seed={c.seed}"


STOP_GRACE_SECONDS = float(os.environ.get("ORCHESTRATOR_STOP_GRACE", "30"))


class InterruptWatch:
    """The backstop of Ctrl-C. The main thread gets KeyboardInterrupt (at the first Ctrl-C only) and stops
    gracefully (Ray shut down, unfinished runs marked KILLED). A watcher thread learns of every SIGINT through
    ``signal.set_wakeup_fd``, which Python's C signal handler writes to even while the main thread is blocked in
    native code (where no KeyboardInterrupt can be raised). If the driver is still stopping ``grace`` seconds after
    the first Ctrl-C, or at a second Ctrl-C, the watcher calls ``stop`` (mark the runs KILLED), stops the local
    tracking server and exits with status 130 without waiting for Ray (a local Ray instance's processes share the
    driver's fate). Installed only from the main thread."""

    def __init__(self, stop, grace: float = STOP_GRACE_SECONDS):
        self.stop, self.grace, self.previous, self.closed = stop, grace, None, False
        self.interrupted, self.previous_handler = False, None
        if threading.current_thread() is not threading.main_thread():
            return
        read, write = os.pipe()
        os.set_blocking(write, False)
        try:
            self.previous = signal.set_wakeup_fd(write)
        except ValueError:
            return
        self.previous_handler = signal.signal(signal.SIGINT, self._first_only)
        threading.Thread(target=self._watch, args=(read,), name="interrupt-watch", daemon=True).start()

    def _first_only(self, signum, frame) -> None:
        """The main thread's SIGINT handler: KeyboardInterrupt at the first Ctrl-C only; later ones are the
        watcher's (an exception raised into the graceful stop would cut it short)."""
        if not self.interrupted:
            self.interrupted = True
            raise KeyboardInterrupt

    def _watch(self, read: int) -> None:
        interrupts, first = 0, None
        while not self.closed:
            ready, _, _ = select.select([read], [], [], 1.0)
            if ready:
                interrupts += os.read(read, 64).count(bytes([signal.SIGINT]))
            if interrupts and first is None:
                first = time.monotonic()
            if interrupts >= 2 or (first is not None and time.monotonic() - first > self.grace):
                why = "Ctrl-C again" if interrupts >= 2 else f"still stopping {self.grace:.0f} s after Ctrl-C"
                print(f"\n{why}: marking the runs KILLED and exiting without waiting for Ray", flush=True)
                try:
                    self.stop()
                finally:
                    for server in list(ACTIVE_SERVERS):
                        server.stop()
                    os._exit(EXIT_INTERRUPTED)

    def close(self) -> None:
        """The graceful stop is done: the watcher ends, the previous wakeup fd is restored."""
        self.closed = True
        if self.previous is not None:
            signal.set_wakeup_fd(self.previous)
        if self.previous_handler is not None:
            signal.signal(signal.SIGINT, self.previous_handler)


def run_sweep(sweep: Sweep, workdir: str = ".", use_cache: bool = True, resume: bool = False,
              address: Optional[str] = None) -> int:
    """Run every trial: train each distinct model once (stage 1: a training run, then the first of its
    trials evaluated on it), then evaluate the other trials on the trained or cached models (stage 2);
    print a summary table; return the exit status (0 all finished, 1 a trial failed, 130 interrupted).

    ``resume``: continue the latest unfinished run of this sweep (same sweep digest) under its parent
    run: trials that finished are not run again, unfinished ones continue (training from the last
    checkpoint). ``address``: join an existing Ray cluster (``auto``, ``host:6379`` or
    ``ray://host:10001``) instead of starting a local Ray instance."""
    import ray
    from mlflow.tracking import MlflowClient

    workdir = os.path.abspath(workdir)
    started = time.time()
    cache = model_cache(sweep, workdir)
    if resume and not os.environ.get("MLFLOW_TRACKING_URI") and not os.path.exists(os.path.join(workdir, "mlflow.db")):
        raise ConfigError("--resume", sweep.name, "a sweep run earlier from this directory (or with this "
                          "MLFLOW_TRACKING_URI)", detail=f"there is no mlflow.db in {workdir}")
    with tracking_server(workdir, log_path=os.path.join(workdir, "mlflow-server.log")) as uri:
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(sweep.name)
        if resume:
            parent = _resumable_parent(client, experiment, sweep)
            experiment_id = experiment.experiment_id
            client.update_run(parent.info.run_id, status="RUNNING")
            client.set_tag(parent.info.run_id, "resumed", str(int(parent.data.tags.get("resumed", "0")) + 1))
        else:
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(sweep.name)
        parent_id = parent.info.run_id if resume else None
        done = _finished_trials(client, experiment_id, parent_id) if resume else set()
        groups = plan(sweep, cache, use_cache)
        if not resume:
            parent_id = client.create_run(
                experiment_id,
                run_name=f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                tags={"sweep": sweep.name, "sweep_digest": sweep.digest(), "trials": str(len(sweep.trials)),
                      "varying": ",".join(sweep.varying), "models": str(len(groups)),
                      "models_cached": str(sum(g.cached for g in groups))},
            ).info.run_id
            client.log_dict(parent_id, sweep.source, "sweep.yaml")
        context = TrialContext(uri, experiment_id, parent_id, sweep.name, cache.root)
        print(f"MLflow: experiment '{sweep.name}', parent run {parent_id} at {uri}", flush=True)
        if resume:
            print(f"resuming: {len(done)} of {len(sweep.trials)} trial(s) already finished", flush=True)
        print(plan_line(groups, cache), flush=True)
        suffix = f"-resume{time.strftime('%Y%m%d-%H%M%S')}" if resume else ""

        status = "FINISHED"

        def hard_stop() -> None:
            end_unfinished_runs(client, experiment_id, parent_id, "KILLED")
            client.set_terminated(parent_id, status="KILLED")

        watch = InterruptWatch(hard_stop)
        try:
            prepare_extractors(sweep)
            os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C raises KeyboardInterrupt here
            os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
            ray.init(
                address=address,
                include_dashboard=False,
                runtime_env={"env_vars": worker_env(uri)},
                log_to_driver=True,
                configure_logging=True,
                logging_level="WARNING",
            )
            if not use_cache:
                for group in groups:
                    cache.invalidate(group.key)
            if resume:  # a model published just before the driver died: its training run finished too
                for group in groups:
                    run = find_run(client, context, TRAIN, training_hash=group.key)
                    if run is not None and run.info.status != "FINISHED" and cache.has(group.key):
                        client.set_terminated(run.info.run_id, status="FINISHED")
            pending = [(group, [t for t in group.trials if t.name not in done]) for group in groups]
            pending = [(group, trials) for group, trials in pending if trials]
            training = [_task(group, trials[:1], train=True) for group, trials in pending if not cache.has(group.key)]
            trained_here = {task["key"] for task in training}
            _fit(sweep, training, context, f"{sweep.name}-{parent_id[:8]}-train{suffix}", workdir)
            evaluations = []
            for group, trials in pending:
                rest = trials[1:] if group.key in trained_here else trials
                if cache.has(group.key):
                    evaluations += [_task(group, [trial], train=False) for trial in rest]
                    continue
                run = (cache.training_run(group.key) or {}).get("run_id", "none")
                for trial in rest:
                    record_unevaluated(client, context, trial.as_dict(), group.key,
                                       f"training failed (training run {run}): not evaluated")
            _fit(sweep, evaluations, context, f"{sweep.name}-{parent_id[:8]}-evaluate{suffix}", workdir)
        except KeyboardInterrupt:
            status = "KILLED"
            print("\ninterrupted: stopping every trial", flush=True)
        finally:
            if ray.is_initialized():
                ray.shutdown()
            killed = end_unfinished_runs(client, experiment_id, parent_id, "KILLED")
            watch.close()
        summaries = _summaries(client, experiment_id, parent_id, sweep)
        if status != "KILLED" and any(s.status != "FINISHED" for s in summaries):
            status = "FAILED"
        client.set_terminated(parent_id, status=status)
    print(summary_table(sweep, summaries, time.time() - started))
    if killed:
        print(f"{len(killed)} run(s) were still running and are marked KILLED")
    return {"FINISHED": EXIT_OK, "FAILED": EXIT_TRIAL_FAILED}.get(status, EXIT_INTERRUPTED)


def _resumable_parent(client, experiment, sweep: Sweep):
    """The latest parent run of this sweep (same digest) that did not finish; ConfigError when none."""
    runs = [] if experiment is None else client.search_runs(
        [experiment.experiment_id], f"tags.sweep_digest = '{sweep.digest()}'", order_by=["attributes.start_time DESC"],
        max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if not parents:
        raise ConfigError("--resume", sweep.name, "a sweep that was run before with the same file and overrides",
                          detail="no earlier run of this sweep in the tracking server")
    if parents[0].info.status == "FINISHED":
        raise ConfigError("--resume", sweep.name, "an unfinished sweep run",
                          detail=f"its latest run {parents[0].info.run_id} finished; run the sweep again instead")
    return parents[0]


def _finished_trials(client, experiment_id: str, parent_id: str) -> set[str]:
    runs = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                              f"tags.{STAGE_TAG} = 'evaluate' and attributes.status = 'FINISHED'", max_results=10_000)
    return {run.data.tags["trial"] for run in runs}


def _task(group: TrainingGroup, trials: list[Trial], train: bool) -> dict:
    """One Ray Tune trial's work (``trial.execute_task``), named after its first trial."""
    return {"name": trials[0].name, "key": group.key, "train": train, "group": [t.name for t in group.trials],
            "trials": [t.as_dict() for t in trials], "max_failures": trials[0].config.resources.max_failures}


def _fit(sweep: Sweep, tasks: list[dict], context: TrialContext, name: str, workdir: str) -> None:
    """Run ``tasks`` on Ray Tune, each with the resources of its trials."""
    from ray import tune

    if not tasks:
        return

    def resources(config: dict) -> dict:
        wanted = config["task"]["trials"][0]["config"]["resources"]
        return {"cpu": wanted["cpu"], "gpu": wanted["gpu"], **dict(wanted["custom"])}

    trainable = tune.with_resources(run_task, resources)
    tuner = tune.Tuner(
        trainable,
        param_space={"task": tune.grid_search(tasks), "context": dataclasses.asdict(context)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=sweep.max_concurrent,
            reuse_actors=True,
            trial_name_creator=lambda t: t.config["task"]["name"],
            trial_dirname_creator=lambda t: t.config["task"]["name"],
        ),
        run_config=tune.RunConfig(
            name=name,
            **_tune_storage(sweep.storage, workdir),
            # a task whose worker died runs again and continues where it stopped (trial.execute_task)
            failure_config=tune.FailureConfig(max_failures=max(t["max_failures"] for t in tasks)),
            callbacks=[_progress_printer(tune, len(tasks), "training" if tasks[0]["train"] else "evaluation")],
            verbose=0,
        ),
    )
    tuner.fit()


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


def _progress_printer(tune, total: int, stage: str):
    """One line per reported result and per finished task (instead of Tune's large tables)."""

    class ProgressPrinter(tune.Callback):
        def __init__(self):
            self.done = 0

        def on_trial_start(self, iteration, trials, trial, **info):
            task = trial.config["task"]
            print(f"[{task['name']}] started ({'training, then evaluation' if task['train'] else 'evaluation'})",
                  flush=True)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            name = trial.config["task"]["name"]
            if "fid" in result:
                print(f"[{name}] fid {result['fid']:.3f} (reference {result['fid_reference']:.3f}), "
                      f"nfe {result['sample_nfe']:.0f}", flush=True)
            elif "train_loss" in result:
                print(f"[{name}] step {result['step']} train_loss {result['train_loss']:.4f}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            outcome = "FAILED" if (trial.last_result or {}).get("failed") else "finished"
            print(f"[{trial.config['task']['name']}] {outcome} ({self.done}/{total} {stage} tasks)", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            print(f"[{trial.config['task']['name']}] FAILED ({self.done}/{total} {stage} tasks)", flush=True)

    return ProgressPrinter()


def _tune_storage(storage: str, workdir: str) -> dict:
    """RunConfig arguments for Tune's state: a directory, or an object store through the same pyarrow file
    system as the model cache (``cache.filesystem``: endpoint and credentials from the environment)."""
    if not is_uri(storage):
        return {"storage_path": _storage_path(storage, workdir)}
    fs, path = filesystem(storage)
    return {"storage_path": path, "storage_filesystem": fs}


def _storage_path(storage: str, workdir: str) -> str:
    return storage if is_uri(storage) else os.path.join(workdir, local_path(storage))


def _summaries(client, experiment_id: str, parent_id: str, sweep: Sweep) -> list[TrialSummary]:
    """Each trial's outcome as its evaluation run recorded it (a trial with no run never started: KILLED)."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                              max_results=10_000)
    by_name = {run.data.tags.get("trial"): run for run in runs if run.data.tags.get(STAGE_TAG) != TRAIN}
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
