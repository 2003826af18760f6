"""Run a sweep on Ray Tune and record it in MLflow: one parent run, one child run per trial.

``run_sweep`` is a sequence of named steps: the preflight (``preflight``), the parent run (``open_tracking``,
``parentrun``), the driver's preparation (``prepare``), the training and evaluation stages on Ray Tune
(``train_stage``, ``evaluate_stage``, ``_fit``) under Ctrl-C handling (``progress.graceful_stop``), and the
summary (``summarize``, ``report``)."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from . import EXIT_INTERRUPTED, EXIT_OK, EXIT_TRIAL_FAILED
from .cache import ModelCache, filesystem, is_uri, local_path
from .keys import training_key
from .collect import collect
from .parentrun import comparison_view, create_experiment, finished_trials, new_parent, parent_guard, reopen_parent
from .preflight import keep_credentials_out_of_tune, network_shape, preflight
from .liveview import results_hint, sweep_display
from .progress import graceful_stop
from .report import SweepReport, build, publish
from .sweepfile import Sweep, Trial
from .tracking import tracking_server, worker_env
from .trial import TRAIN, TrialContext, find_run, record_unevaluated, run_task


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


def describe(sweep: Sweep, groups: Optional[list[TrainingGroup]] = None, cache: Optional[ModelCache] = None,
             datasets: Optional[dict] = None) -> str:
    """The trial list that ``validate`` and ``sweep --dry-run`` print (with the training plan when given, and each
    model's size when the data sets are: ``preflight.check_data``'s)."""
    lines = [f"sweep {sweep.name}: {len(sweep.trials)} trial(s); varying: {', '.join(sweep.varying) or 'nothing'}"]
    keys = {t.name: g.key for g in groups or [] for t in g.trials}
    for trial in sweep.trials:
        res = trial.config.resources
        model = f"  model={keys[trial.name][:8]}" if trial.name in keys else ""
        lines.append(f"  {trial.name:<40} cpu={res.cpu:g} gpu={res.gpu:g}  {_trial_line(trial)}{model}")
    if groups is not None and datasets is not None:
        lines += model_lines(groups, datasets)
    if groups is not None and cache is not None:
        lines.append(plan_line(groups, cache))
    return "\n".join(lines)


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
    context: TrialContext  # the tracking server, experiment and parent run the tasks record themselves in
    groups: list[TrainingGroup]
    done: set[str] = field(default_factory=set)  # resumed: the trials that finished earlier
    suffix: str = ""  # of the Tune experiments' names: "-resume<time>" when resumed
    display: Any = None  # what the driver shows while the stages run (``liveview.sweep_display``)


def run_sweep(sweep: Sweep, workdir: str = ".", use_cache: bool = True, resume: bool = False,
              address: Optional[str] = None) -> int:
    """Run every trial: train each distinct model once (stage 1: a training run, then the first of its
    trials evaluated on it), then evaluate the other trials on the trained or cached models (stage 2);
    print a summary table; return the exit status (0 all finished, 1 a trial failed, 130 interrupted).

    ``resume``: continue the latest unfinished run of this sweep (same sweep digest) under its parent
    run: trials that finished are not run again, unfinished ones continue (training from the last
    checkpoint). ``address``: join an existing Ray cluster (``auto``, ``host:6379`` or
    ``ray://host:10001``) instead of starting a local Ray instance."""
    workdir = os.path.abspath(workdir)
    started = time.time()
    cache = model_cache(sweep, workdir)
    with preflight(sweep, workdir, resume, address) as remote:  # Ray is up until the end of this block
        env = worker_env() if remote else {}  # a local instance's workers inherit this environment
        with tracking_server(workdir, log_path=os.path.join(workdir, "mlflow-server.log")) as uri:
            run = open_tracking(uri, sweep, cache, workdir, use_cache, resume, env)
            with parent_guard(run.client, run.context.experiment_id, run.context.parent_run_id):
                announce(run)
                with graceful_stop(run.client, run.context.experiment_id, run.context.parent_run_id) as stop:
                    prepare(run)
                    pending = pending_trials(run)
                    with sweep_display([t.name for _, trials in pending for t in trials], sweep.max_concurrent,
                                       sweep.name) as run.display:
                        trained_here = train_stage(run, pending)
                        evaluate_stage(run, pending, trained_here)
                status, sweep_report = summarize(run, stop.status)
    code = report(sweep_report, status, stop.killed, time.time() - started)
    print(results_hint(workdir, os.environ.get("MLFLOW_TRACKING_URI"), sweep_report.view), flush=True)
    return code


def open_tracking(uri: str, sweep: Sweep, cache: ModelCache, workdir: str, use_cache: bool, resume: bool,
                  env: dict) -> SweepRun:
    """The MLflow experiment and parent run on the tracking server at ``uri``, with the training plan: a new
    parent run, or (``resume``) the latest unfinished one of this sweep reopened, with the trials it finished."""
    from mlflow.tracking import MlflowClient

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


def prepare(run: SweepRun) -> None:
    """The driver's part before any task: the FID feature extractors and reference features prepared once;
    with ``--no-cache`` the plan's models dropped from the cache; when resumed, a model published just before
    the driver died has its training run marked FINISHED too."""
    prepare_extractors(run.sweep)
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


def train_stage(run: SweepRun, pending: list[tuple[TrainingGroup, list[Trial]]]) -> set[str]:
    """Stage 1: every model not in the cache trained, then its group's first pending trial evaluated on it (one
    Tune task each); returns the training keys of the models trained here."""
    training = [_task(group, trials[:1], train=True) for group, trials in pending if not run.cache.has(group.key)]
    trained_here = {task["key"] for task in training}
    _fit(run, training, "train")
    return trained_here


def evaluate_stage(run: SweepRun, pending: list[tuple[TrainingGroup, list[Trial]]], trained_here: set[str]) -> None:
    """Stage 2: every other pending trial evaluated on its model, trained or cached (one Tune task each); the
    trials of a model that failed to train are recorded FAILED, not evaluated."""
    evaluations = []
    for group, trials in pending:
        rest = trials[1:] if group.key in trained_here else trials
        if run.cache.has(group.key):
            evaluations += [_task(group, [trial], train=False) for trial in rest]
            continue
        training = (run.cache.training_run(group.key) or {}).get("run_id", "none")
        for trial in rest:
            record_unevaluated(run.client, run.context, trial.as_dict(), group.key,
                               f"training failed (training run {training}): not evaluated")
    _fit(run, evaluations, "evaluate")


def summarize(run: SweepRun, status: str) -> tuple[str, SweepReport]:
    """Each trial's outcome from its evaluation run, compared across variants in the sweep's report (written to
    ``reports/<sweep>/`` and logged on the parent run), and the parent run ended with the sweep's status: ``status``
    (FINISHED, or KILLED by Ctrl-C), FAILED when a trial did not finish. A report that cannot be made is said and
    tagged (``report.error``); the sweep's status stands."""
    context = run.context
    results = collect(run.client, context.parent_run_id, run.sweep.trials)
    if status != "KILLED" and any(r.status != "FINISHED" for r in results.records):
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


def report(sweep_report: SweepReport, status: str, killed: list[str], seconds: float) -> int:
    """Print the summary (trials, variants with their intervals, verdicts), where the report is and the runs Ctrl-C
    marked KILLED; the exit status for the sweep's status."""
    print(sweep_report.summary)
    print(f"\nsweep finished {status} in {seconds / 60:.1f} min", flush=True)
    if sweep_report.path:
        print(f"report: {sweep_report.path}")
    if killed:
        print(f"{len(killed)} run(s) were still running and are marked KILLED")
    return {"FINISHED": EXIT_OK, "FAILED": EXIT_TRIAL_FAILED}.get(status, EXIT_INTERRUPTED)


def _task(group: TrainingGroup, trials: list[Trial], train: bool) -> dict:
    """One Ray Tune trial's work (``trial.execute_task``), named after its first trial."""
    return {"name": trials[0].name, "key": group.key, "train": train, "group": [t.name for t in group.trials],
            "trials": [t.as_dict() for t in trials], "max_failures": trials[0].config.resources.max_failures}


def _fit(run: SweepRun, tasks: list[dict], stage: str) -> None:
    """Run ``tasks`` on Ray Tune, each with the resources of its trials, as the Tune experiment
    ``<sweep>-<parent run>-<stage><suffix>``. ``run.env``: the credentials workers of a joined cluster need,
    handed over through Ray's object store (``tune.with_parameters``)."""
    from ray import tune

    if run.display is not None:
        run.display.stage(tasks, last=stage == "evaluate")
    if not tasks:
        return
    sweep = run.sweep

    def resources(config: dict) -> dict:
        wanted = config["task"]["trials"][0]["config"]["resources"]
        return {"cpu": wanted["cpu"], "gpu": wanted["gpu"], **dict(wanted["custom"])}

    keep_credentials_out_of_tune()
    trainable = tune.with_resources(tune.with_parameters(run_task, env=run.env), resources)
    tuner = tune.Tuner(
        trainable,
        param_space={"task": tune.grid_search(tasks), "context": dataclasses.asdict(run.context)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=sweep.max_concurrent,
            reuse_actors=True,
            trial_name_creator=lambda t: t.config["task"]["name"],
            trial_dirname_creator=lambda t: trial_dirname(t.config["task"]["name"]),
        ),
        run_config=tune.RunConfig(
            name=f"{sweep.name}-{run.context.parent_run_id[:8]}-{stage}{run.suffix}",
            **_tune_storage(sweep.storage, run.workdir),
            # a task whose worker died runs again and continues where it stopped (trial.execute_task)
            failure_config=tune.FailureConfig(max_failures=max(t["max_failures"] for t in tasks)),
            callbacks=[run.display.callback(tune)] if run.display is not None else [],
            verbose=0,
        ),
    )
    tuner.fit()


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
    reference split's features into the cache (or, for published statistics, read them, and with
    ``eval.download`` fetch clean-fid's files), so that concurrent trials load them from the cache instead of
    each computing (or downloading) its own copy. The preflight has checked what can be checked before Ray
    starts (``preflight.check_fid``); ConfigError naming the key here too (``diffusion.evaluation.check_fid``)."""
    import torch

    from diffusion.data import load_dataset
    from diffusion.evaluation import check_fid
    from diffusion.metrics import REFERENCES, get_extractor, load_published_stats, reference_features
    from diffusion.registry import options_for

    seen = set()
    for trial in sweep.trials:
        cfg = trial.config
        key = (repr(cfg.data), cfg.eval.extractor, cfg.eval.reference, cfg.eval.reference_split,
               cfg.eval.classifier_steps, cfg.eval.cache_dir, cfg.eval.download)
        if not cfg.eval.fid or key in seen:
            continue
        seen.add(key)
        dataset = load_dataset(cfg.data)
        check_fid(dataset, cfg)
        name, extract, info = get_extractor(cfg.eval.extractor, dataset,
                                            **options_for(get_extractor, cfg.eval, device=torch.device("cpu")))
        published = REFERENCES.get(cfg.eval.reference)
        if published is None:
            reference_features(dataset, cfg.eval.reference_split, name, extract, info, cfg.eval.cache_dir)
        else:
            stats = load_published_stats(published, cfg.eval.cache_dir, download=cfg.eval.download)
            print(f"FID reference for {cfg.data.name}: {published.label} from {stats.path}", flush=True)
        if name == "classifier":
            origin = "loaded from cache" if info.get("loaded_from_cache") else "trained"
            print(f"FID features for {cfg.data.name}: classifier {origin}, test accuracy {info['accuracy']:.4f}",
                  flush=True)


def _tune_storage(storage: str, workdir: str) -> dict:
    """RunConfig arguments for Tune's state: a directory, or an object store through the same pyarrow file
    system as the model cache (``cache.filesystem``: endpoint and credentials from the environment)."""
    if not is_uri(storage):
        return {"storage_path": _storage_path(storage, workdir)}
    fs, path = filesystem(storage)
    return {"storage_path": path, "storage_filesystem": fs}


def _storage_path(storage: str, workdir: str) -> str:
    return storage if is_uri(storage) else os.path.join(workdir, local_path(storage))
