"""Run a sweep on Ray Tune and record it in MLflow: one parent run, one child run per trial."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import re
import select
import signal
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional

from diffusion.config import training_key
from diffusion.errors import ConfigError

from . import EXIT_INTERRUPTED, EXIT_OK, EXIT_TRIAL_FAILED
from .cache import ModelCache, filesystem, is_uri, local_path
from .sweepfile import Sweep, Trial, key_origin
from .tracking import (ACTIVE_SERVERS, SECRET_ENV, check_tracking_uri_credentials, end_unfinished_runs, tracking_server,
                       worker_env)
from .trial import FAILURE_TAG, STAGE_TAG, TRAIN, TrialContext, find_run, record_unevaluated, run_task



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
    the first Ctrl-C, or at a second Ctrl-C, the watcher calls ``stop`` (mark the runs KILLED), leaves the local
    tracking server (stopped unless another sweep in the directory uses it) and exits with status 130 without waiting for Ray (a local Ray instance's processes share the
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
                    for server in list(ACTIVE_SERVERS):  # left; stopped only if no other sweep uses it
                        server.stop(timeout=10)
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

    workdir = os.path.abspath(workdir)
    started = time.time()
    cache = model_cache(sweep, workdir)
    if resume and not os.environ.get("MLFLOW_TRACKING_URI") and not os.path.exists(os.path.join(workdir, "mlflow.db")):
        raise ConfigError("--resume", sweep.name, "a sweep run earlier from this directory (or with this "
                          "MLFLOW_TRACKING_URI)", detail=f"there is no mlflow.db in {workdir}")
    # Preflight: what would fail later fails here, before MLflow starts or anything is written.
    check_tracking_uri_credentials(os.environ.get("MLFLOW_TRACKING_URI"))
    check_data(sweep)
    remote = start_ray(sweep, address)
    try:
        return _run_sweep(sweep, workdir, cache, started, use_cache, resume, remote)
    finally:
        if ray.is_initialized():
            ray.shutdown()


def start_ray(sweep: Sweep, address: Optional[str]) -> bool:
    """Start a local Ray instance, or join the cluster at ``address``, and check that some node can give every
    trial its resources (ConfigError otherwise, with Ray shut down again). Returns whether the workers are on a
    cluster joined here (they need the driver's credentials handed to them) rather than a local instance
    started here (they inherit the driver's environment)."""
    import ray

    remote = address is not None or bool(os.environ.get("RAY_ADDRESS"))
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C raises KeyboardInterrupt here
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    # Ray's notice that it turned token authentication on for a local instance (docs/SECURITY.md) is not news
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(address=address, include_dashboard=False, log_to_driver=True, configure_logging=True,
             logging_level="WARNING")
    if not remote:
        private_token_file()
    try:
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        check_resources(sweep, nodes, f"the Ray cluster at {address}" if remote else "this machine")
    except BaseException:
        ray.shutdown()
        raise
    return remote


def private_token_file() -> None:
    """Ray starts a local instance with token authentication (its ports listen on every interface), keeping the
    token in ``~/.ray/auth_token`` (or ``$RAY_AUTH_TOKEN_PATH``), created readable by everyone. Make it readable
    by its owner only, so that other users of the machine cannot join the instance and run code."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser(os.path.join("~", ".ray", "auth_token"))
    try:
        info = os.stat(path)
        if info.st_uid == os.getuid() and info.st_mode & 0o077:
            os.chmod(path, 0o600)
    except OSError:  # no token file (RAY_AUTH_TOKEN given, or authentication off): nothing to protect
        pass


def check_data(sweep: Sweep) -> None:
    """Load each data set the sweep uses once (ConfigError naming the trial's key when its files are missing)."""
    from diffusion.data import load_dataset

    seen = set()
    for trial in sweep.trials:
        if repr(trial.config.data) in seen:
            continue
        seen.add(repr(trial.config.data))
        try:
            load_dataset(trial.config.data)
        except ConfigError as error:
            raise ConfigError(_origin(sweep, trial, error.key), error.value, error.accepted,
                              detail=error.detail) from None


def local_resources() -> list[dict]:
    """This machine as one Ray node would see it: its CPUs and GPUs."""
    import torch

    return [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]


RESOURCE_KEYS = {"CPU": "cpu", "GPU": "gpu"}


def check_resources(sweep: Sweep, nodes: list[dict], where: str) -> None:
    """ConfigError for the first trial whose resources no single node of ``nodes`` (Ray's resource dicts) has:
    Ray would keep it pending forever."""
    for trial in sweep.trials:
        res = trial.config.resources
        wanted = {"CPU": res.cpu, "GPU": res.gpu, **{name: float(amount) for name, amount in res.custom.items()}}
        wanted = {name: amount for name, amount in wanted.items() if amount > 0}
        if any(all(node.get(name, 0.0) >= amount for name, amount in wanted.items()) for node in nodes):
            continue
        for name, amount in wanted.items():
            most = max((node.get(name, 0.0) for node in nodes), default=0.0)
            key = f"resources.{RESOURCE_KEYS[name]}" if name in RESOURCE_KEYS else f"resources.custom.{name}"
            if amount > most:
                have = f"at most {most:g} (the most any node of {where} has)" if most else f"nothing: no node of {where} has {name}"
                raise ConfigError(_origin(sweep, trial, key), amount, have,
                                  detail=f"trial {trial.name} would wait for ever")
        raise ConfigError(_origin(sweep, trial, "resources"), dict(wanted), f"resources one node of {where} has",
                          detail=f"no single node has all of them; trial {trial.name} would wait for ever")


def _origin(sweep: Sweep, trial: Trial, key: str) -> str:
    """The sweep-file path of a trial's config key (grid.<key>, variants.<name>.<key> or base.<key>)."""
    variants = sweep.source.get("variants") or {}
    return key_origin(key, sweep.source.get("base") or {}, trial.variant if variants else None,
                      variants.get(trial.variant) or {}, trial.axes)


def _run_sweep(sweep: Sweep, workdir: str, cache: ModelCache, started: float, use_cache: bool, resume: bool,
               remote: bool) -> int:
    import ray
    from mlflow.tracking import MlflowClient

    env = worker_env() if remote else {}  # a local instance's workers inherit this environment
    with tracking_server(workdir, log_path=os.path.join(workdir, "mlflow-server.log")) as uri:
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(sweep.name)
        if resume:
            parent = _resumable_parent(client, experiment, sweep)
            experiment_id = experiment.experiment_id
            client.update_run(parent.info.run_id, status="RUNNING")
            client.set_tag(parent.info.run_id, "resumed", str(int(parent.data.tags.get("resumed", "0")) + 1))
        else:
            experiment_id = experiment.experiment_id if experiment else _create_experiment(client, sweep.name)
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
        with parent_guard(client, experiment_id, parent_id):
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
                _fit(sweep, training, context, f"{sweep.name}-{parent_id[:8]}-train{suffix}", workdir, env)
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
                _fit(sweep, evaluations, context, f"{sweep.name}-{parent_id[:8]}-evaluate{suffix}", workdir, env)
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


def _create_experiment(client, name: str) -> str:
    """The new experiment's id; the existing one's when another sweep of the same name created it meanwhile."""
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


@contextlib.contextmanager
def parent_guard(client, experiment_id: str, parent_id: str) -> Iterator[None]:
    """A sweep that fails after its parent run started (an error, not Ctrl-C, which ends the runs KILLED itself)
    ends the parent run FAILED, the reason in its ``failure_reason`` tag, and every child run still RUNNING
    with it; the error goes on up."""
    try:
        yield
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
        try:
            end_unfinished_runs(client, experiment_id, parent_id, "FAILED")
            client.set_tag(parent_id, FAILURE_TAG, reason[:5000])
            client.set_terminated(parent_id, status="FAILED")
        except Exception as second:  # noqa: BLE001 - the tracking server is gone too: report the first error
            print(f"could not mark parent run {parent_id} FAILED: {second}", flush=True)
        raise


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


def _fit(sweep: Sweep, tasks: list[dict], context: TrialContext, name: str, workdir: str, env: dict) -> None:
    """Run ``tasks`` on Ray Tune, each with the resources of its trials. ``env``: the credentials workers of a
    joined cluster need, handed over through Ray's object store (``tune.with_parameters``)."""
    from ray import tune

    if not tasks:
        return

    def resources(config: dict) -> dict:
        wanted = config["task"]["trials"][0]["config"]["resources"]
        return {"cpu": wanted["cpu"], "gpu": wanted["gpu"], **dict(wanted["custom"])}

    keep_credentials_out_of_tune()
    trainable = tune.with_resources(tune.with_parameters(run_task, env=env), resources)
    tuner = tune.Tuner(
        trainable,
        param_space={"task": tune.grid_search(tasks), "context": dataclasses.asdict(context)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=sweep.max_concurrent,
            reuse_actors=True,
            trial_name_creator=lambda t: t.config["task"]["name"],
            trial_dirname_creator=lambda t: trial_dirname(t.config["task"]["name"]),
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


def keep_credentials_out_of_tune() -> None:
    """Ray Tune copies AWS credentials from the driver's environment into the runtime_env of every trial actor
    (``ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE``), and Ray's runtime_env agent logs runtime_envs
    in plain text. Take them off that list: a local instance's workers inherit them anyway, and a joined
    cluster's get them through ``tune.with_parameters`` (``_fit``)."""
    from ray.tune.execution import class_cache

    for name in SECRET_ENV:
        class_cache.ENV_VARS_TO_PROPAGATE.discard(name)


_UNSAFE_IN_PATH = re.compile(r"[^A-Za-z0-9_.,=+-]")


def trial_dirname(name: str) -> str:
    """A directory name for a trial: its name where that is a safe one, else the name with every character
    outside [A-Za-z0-9_.,=+-] replaced and a hash of the whole name appended (grid values may hold '/', quotes,
    spaces; two names that differ only there still get two directories)."""
    safe = _UNSAFE_IN_PATH.sub("_", name)[:100]
    if safe == name:
        return name
    return f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


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
