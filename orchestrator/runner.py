"""Run a sweep on Ray Tune and record it in MLflow: one parent run, one child run per trial.

``run_sweep`` is a sequence of named steps: the preflight (``preflight``; the tracking server starts in the
background while Ray does), the parent run (``open_tracking``, ``parentrun``), the driver's preparation
(``prepare``: FID's extractor started in a Ray task of its own, ``start_fid_tasks``), the trials in one Ray Tune
experiment (``tuning.run_trials``: each evaluation starts once its own model is trained, ``taskqueue.TaskQueue``)
under Ctrl-C handling (``progress.graceful_stop``), and the summary (``summarize``, ``report``)."""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from . import EXIT_INTERRUPTED, EXIT_OK, EXIT_TRIAL_FAILED
from .cache import ModelCache, is_uri
from .keys import training_key
from .preflight import network_shape, preflight
from .sweepfile import Sweep, Trial
from .tracking import starting_tracking_server, worker_env
from .tuning import run_trials, storage_path

# MLflow, Ray, scipy and the trial's modules (``trial``, ``collect``, ``report``, ``parentrun``, ``progress``) are
# imported in the functions that use them: ``run_sweep`` starts the tracking server and Ray first, and imports them
# while those start (``_heavy_imports``); ``validate`` and ``--dry-run`` need none of them.


DRIVER_TAG = "driver"  # the parent run's: host:pid of the process that runs the sweep (the CLI)


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
    storage = storage_path(sweep.storage, os.path.abspath(workdir))
    cache = ModelCache(f"{storage.rstrip('/')}/models" if is_uri(storage) else os.path.join(storage, "models"))
    cache.check()
    return cache


def plan_line(groups: list[TrainingGroup], cache: ModelCache) -> str:
    cached = sum(g.cached for g in groups)
    evaluations = sum(len(g.trials) for g in groups)
    return (f"training: {len(groups) - cached} model(s) to train, {cached} reused from the cache ({cache.root}); "
            f"{evaluations} evaluation(s)")


def describe(sweep: Sweep, groups: Optional[list[TrainingGroup]] = None, cache: Optional[ModelCache] = None,
             datasets: Optional[dict] = None) -> str:
    """The trial list that ``validate`` and ``sweep --dry-run`` print (with the training plan when given, and each
    model's size when the data sets are: ``preflight.check_data``'s)."""
    lines = [f"sweep {sweep.name}: {len(sweep.trials)} trial(s); varying: {', '.join(sweep.varying) or 'nothing'}"]
    keys = {t.name: g.key for g in groups or [] for t in g.trials}
    for trial in sweep.trials:
        res = trial.config.resources
        model = f"  model={keys[trial.name][:8]}" if trial.name in keys else ""
        workers = f" x {res.workers} workers" if res.workers > 1 else ""
        drawn = "".join(f" {key}={_shown(trial.axes[key])}" for key in (sweep.search.space if sweep.search else ()))
        lines.append(f"  {trial.name:<40} cpu={res.cpu:g} gpu={res.gpu:g}{workers}  {_trial_line(trial)}{drawn}{model}")
    if sweep.search is not None:
        lines.append(sweep.search.describe())
    if sweep.scheduler is not None:
        lines.append(sweep.scheduler.describe())
    if groups is not None and datasets is not None:
        lines += model_lines(groups, datasets)
    if groups is not None and cache is not None:
        lines.append(plan_line(groups, cache))
    return "\n".join(lines)


def _shown(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_lines(groups: list[TrainingGroup], datasets: dict) -> list[str]:
    """One line per model: its parameters, the FLOPs of a training step and of all its steps
    (``diffusion.modelsize``; a latent model's network on its codes, the VAE not counted)."""
    from diffusion.modelsize import human, model_size

    described: dict[str, list[str]] = {}  # what is said of a model -> the models it is said of
    sizes: dict[tuple, object] = {}
    for group in groups:
        cfg = group.trials[0].config
        dataset = datasets[repr(cfg.data)]
        shape = network_shape(cfg, dataset)
        classes = dataset.num_classes if cfg.model.class_conditional else None
        key = (repr(cfg.model), shape, classes)
        if key not in sizes:
            sizes[key] = model_size(cfg.model, shape, classes)
        size = sizes[key]
        step = size.step_flops(cfg.train.batch_size)
        text = (f"{human(size.parameters)} parameters ({size.parameters:,}); {human(step, 'FLOP')} per training step "
                f"of {cfg.train.batch_size} x {'x'.join(map(str, shape))}; {human(step * cfg.train.steps, 'FLOP')} "
                f"in {cfg.train.steps:,} steps")
        described.setdefault(text, []).append(group.key[:8])
    lines = ["models (the diffusion network; FLOPs of forward and backward passes: matmuls, convolutions, attention):"]
    lines += [f"  model={','.join(keys)}  {text}" for text, keys in described.items()]
    for group in groups:  # diffusion.data.not_downloaded: a data set data.download fetches when the sweep runs
        data = group.trials[0].config.data
        note = f"data {data.name}: not in {data.root} yet; the sweep downloads it first (data.download: true)"
        if len(datasets[repr(data)].train) == 0 and note not in lines:
            lines.append(note)
    return lines


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


@dataclass
class SweepRun:
    """One run of a sweep once its parent run is open: what the steps after ``open_tracking`` share."""

    sweep: Sweep
    workdir: str
    cache: ModelCache
    use_cache: bool
    resume: bool
    env: dict  # the credentials a joined cluster's workers are handed (``tracking.worker_env``); {} for a local Ray
    client: Any  # an MlflowClient of the tracking server
    context: "TrialContext"  # the tracking server, experiment and parent run the tasks record themselves in
    groups: list[TrainingGroup]
    done: set[str] = field(default_factory=set)  # resumed: the trials that finished earlier
    suffix: str = ""  # of the Tune experiments' names: "-resume<time>" when resumed
    display: Any = None  # what the driver shows while the trials run (``liveview.sweep_display``)
    fid_tasks: list = field(default_factory=list)  # the FID preparations' Ray tasks (``start_fid_tasks``)


def run_sweep(sweep: Sweep, workdir: str = ".", use_cache: bool = True, resume: bool = False,
              address: Optional[str] = None) -> int:
    """Run every trial: train each distinct model once (a training run, then the first of its trials evaluated on
    it), and evaluate the other trials on their trained or cached model as soon as it is there, all in one Ray
    Tune experiment (``run_trials``); print a summary table; return the exit status (0 all finished, 1 a trial
    failed, 130 interrupted).

    ``resume``: continue the latest unfinished run of this sweep (same sweep digest) under its parent
    run: trials that finished are not run again, unfinished ones continue (training from the last
    checkpoint). ``address``: join an existing Ray cluster (``auto``, ``host:6379`` or
    ``ray://host:10001``) instead of starting a local Ray instance."""
    workdir = os.path.abspath(workdir)
    started = time.time()
    cache = model_cache(sweep, workdir)
    with starting_tracking_server(workdir, log_path=os.path.join(workdir, "mlflow-server.log")) as tracking:
        # the local tracking server starts in the background once the checks passed, while Ray starts
        with preflight(sweep, workdir, resume, address, meanwhile=tracking.start) as remote:  # Ray is up in here
            env = worker_env() if remote else {}  # a local instance's workers inherit this environment
            _heavy_imports()  # while the tracking server starts
            from .liveview import results_hint, sweep_display
            from .parentrun import parent_guard
            from .progress import graceful_stop

            run = open_tracking(tracking.uri(), sweep, cache, workdir, use_cache, resume, env)
            with parent_guard(run.client, run.context.experiment_id, run.context.parent_run_id):
                announce(run)
                with graceful_stop(run.client, run.context.experiment_id, run.context.parent_run_id) as stop:
                    pending = pending_trials(run)
                    prepare(run, pending)
                    with sweep_display([t.name for _, trials in pending for t in trials], sweep.max_concurrent,
                                       sweep.name) as run.display:
                        run_trials(run, pending)
                    fid_outcome(run)
                status, sweep_report = summarize(run, stop.status)
    code = report(sweep_report, status, stop.killed, time.time() - started)
    print(results_hint(workdir, os.environ.get("MLFLOW_TRACKING_URI"), sweep_report.view), flush=True)
    return code


def _heavy_imports() -> None:
    """The modules the rest of ``run_sweep`` needs (MLflow's client, Ray Tune, the trial's and the report's modules),
    imported in the driver while the tracking server starts rather than before it."""
    from . import collect, parentrun, progress, report, taskqueue, trial  # noqa: F401
    from ray import tune  # noqa: F401


def open_tracking(uri: str, sweep: Sweep, cache: ModelCache, workdir: str, use_cache: bool, resume: bool,
                  env: dict) -> SweepRun:
    """The MLflow experiment and parent run on the tracking server at ``uri``, with the training plan: a new
    parent run, or (``resume``) the latest unfinished one of this sweep reopened, with the trials it finished."""
    from mlflow.tracking import MlflowClient

    from .parentrun import comparison_view, create_experiment, finished_trials, new_parent, reopen_parent
    from .trial import TrialContext

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(sweep.name)
    parent_id, done = None, set()
    if resume:
        parent_id = reopen_parent(client, experiment, sweep)
        experiment_id = experiment.experiment_id
        done = finished_trials(client, experiment_id, parent_id)
    else:
        experiment_id = experiment.experiment_id if experiment else create_experiment(client, sweep.name)
    groups = plan(sweep, cache, use_cache)
    if not resume:
        parent_id = new_parent(client, experiment_id, sweep, len(groups), sum(g.cached for g in groups))
    comparison_view(client, experiment_id, parent_id, sweep)
    client.set_tag(parent_id, DRIVER_TAG, f"{socket.gethostname()}:{os.getpid()}")  # this run's (resumed: latest)
    context = TrialContext(uri, experiment_id, parent_id, sweep.name, cache.root)
    suffix = f"-resume{time.strftime('%Y%m%d-%H%M%S')}" if resume else ""
    return SweepRun(sweep, workdir, cache, use_cache, resume, env, client, context, groups, done, suffix)


def announce(run: SweepRun) -> None:
    """Where the sweep is recorded, how far a resumed one got, and the training plan."""
    context = run.context
    print(f"MLflow: experiment '{run.sweep.name}', parent run {context.parent_run_id} at {context.tracking_uri}",
          flush=True)
    if run.resume:
        print(f"resuming: {len(run.done)} of {len(run.sweep.trials)} trial(s) already finished", flush=True)
    print(plan_line(run.groups, run.cache), flush=True)


def prepare(run: SweepRun, pending: list[tuple["TrainingGroup", list[Trial]]]) -> None:
    """The driver's part before any trial: the FID feature extractors and reference features the pending trials
    need prepared by Ray tasks of their own (``start_fid_tasks``; not awaited here); with ``--no-cache`` the plan's
    models dropped from the cache; when resumed, a model published just before the driver died has its training run
    marked FINISHED too."""
    from .trial import TRAIN, find_run

    run.fid_tasks = start_fid_tasks(run, [trial for _, trials in pending for trial in trials])
    if not run.use_cache:
        for group in run.groups:
            run.cache.invalidate(group.key)
    if run.resume:
        for group in run.groups:
            training = find_run(run.client, run.context, TRAIN, training_hash=group.key)
            if training is not None and training.info.status != "FINISHED" and run.cache.has(group.key):
                run.client.set_terminated(training.info.run_id, status="FINISHED")


def pending_trials(run: SweepRun) -> list[tuple[TrainingGroup, list[Trial]]]:
    """Each group with its trials still to run (all of them, unless resumed); groups with none left out."""
    pending = [(group, [t for t in group.trials if t.name not in run.done]) for group in run.groups]
    return [(group, trials) for group, trials in pending if trials]


def summarize(run: SweepRun, status: str) -> tuple[str, "SweepReport"]:
    """Each trial's outcome from its evaluation run, compared across variants in the sweep's report (written to
    ``reports/<sweep>/`` and logged on the parent run), and the parent run ended with the sweep's status: ``status``
    (FINISHED, or KILLED by Ctrl-C), FAILED when a trial did not finish. A report that cannot be made is said and
    tagged (``report.error``); the sweep's status stands."""
    from .collect import collect
    from .report import build, publish

    context = run.context
    results = collect(run.client, context.parent_run_id, run.sweep.trials)
    if status != "KILLED" and any(r.status not in ("FINISHED", "STOPPED") for r in results.records):
        status = "FAILED"
    results.status = status
    sweep_report = build(results)
    try:
        sweep_report.path = publish(run.client, sweep_report, run.workdir)
    except Exception as error:  # noqa: BLE001 - the runs are recorded; the report can be made again
        reason = f"{type(error).__name__}: {error}"
        print(f"the sweep's report could not be written ({reason}); `orchestrator report {context.parent_run_id}` "
              "makes it again", flush=True)
        run.client.set_tag(context.parent_run_id, "report.error", reason[:5000])
    run.client.set_terminated(context.parent_run_id, status=status)
    return status, sweep_report


def report(sweep_report: "SweepReport", status: str, killed: list[str], seconds: float) -> int:
    """Print the summary (trials, variants with their intervals, verdicts), where the report is and the runs Ctrl-C
    marked KILLED; the exit status for the sweep's status."""
    print(sweep_report.summary)
    print(f"\nsweep finished {status} in {seconds / 60:.1f} min", flush=True)
    if sweep_report.path:
        print(f"report: {sweep_report.path}")
    if killed:
        print(f"{len(killed)} run(s) were still running and are marked KILLED")
    return {"FINISHED": EXIT_OK, "FAILED": EXIT_TRIAL_FAILED}.get(status, EXIT_INTERRUPTED)


def start_fid_tasks(run: SweepRun, trials: list[Trial]) -> list:
    """One Ray task per FID preparation the ``trials`` need (``stages.fid_spec``: the data set, the extractor, the
    reference): each trains (or loads) the feature extractor, e.g. the ``classifier`` on the digits, and extracts the
    reference features into ``eval.cache_dir`` (``stages.fid_features``), under the model cache's lock of its entry.
    Only work that takes long is started ahead (``stages.fid_work_ahead``: a classifier to train, files to fetch);
    what is on disk the evaluations load. Nothing waits for the tasks here: the trainings run meanwhile, and the first
    evaluation that needs one waits for its lock (a task that has not started by then leaves the work to that evaluation, which takes the lock first; the
    others then load what it made). The tasks ask for no CPU: the evaluation that waits for one holds the CPU it
    uses. Returns [(the trial it was started for, its ObjectRef)] (``fid_outcome``)."""
    import ray

    from diffusion.data import load_dataset

    from .stages import fid_spec, fid_task, fid_work_ahead

    specs = {}
    for trial in trials:
        spec = fid_spec(trial.config)
        if spec is not None:
            specs.setdefault(json.dumps(spec, sort_keys=True, default=str), trial)
    for trial in specs.values():  # a directory that cannot be made fails the sweep here, once, not every evaluation
        os.makedirs(os.path.expanduser(trial.config.eval.cache_dir), exist_ok=True)
    specs = {key: trial for key, trial in specs.items() if fid_work_ahead(trial.config, load_dataset(trial.config.data))}
    if not specs:
        return []
    task = ray.remote(num_cpus=0, max_retries=0)(fid_task)
    env = ray.put(run.env)  # a joined cluster's credentials (object store access), never in the task's spec
    return [(trial, task.remote(trial.as_dict(), run.cache.root, env)) for trial in specs.values()]


def fid_outcome(run: SweepRun) -> None:
    """What the FID preparation tasks did (trained or loaded, where, how long), said once they are done."""
    import ray

    for trial, ref in run.fid_tasks:
        ready, _ = ray.wait([ref], timeout=0)
        if not ready:
            continue
        try:
            record = ray.get(ref)
        except Exception as error:  # noqa: BLE001 - the evaluations prepared it themselves, and said so
            print(f"FID features for {trial.config.data.name}: the preparation task failed ({type(error).__name__}: "
                  f"{str(error)[:300]})", flush=True)
            continue
        print(f"FID features for {trial.config.data.name}: {record['summary']}", flush=True)
