"""A sweep's results read back from MLflow: its parent run, each trial's evaluation run as a ``TrialRecord``, the
training curves and the sample grids. What the summary, the comparison and the report are made of.

``find_parent`` takes a sweep's name (its latest parent run) or a parent run's id."""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Optional

from diffusion.errors import ConfigError
from diffusion.evaluation import SAMPLES_IMAGE

from .compare import SEED_AXIS, TrialRecord, variant_label
from .scheduler import STOPPED_STEP_TAG, STOPPED_TAG, stopped_line
from .trial import FAILURE_TAG, STAGE_TAG, TRAIN, TRAINING_RUN_TAG

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
PARENT_TAG = "mlflow.parentRunId"


@dataclass
class SweepResults:
    """What a sweep recorded: ``records`` one per trial (in the sweep's order when the sweep is known, with the
    trials that never started as KILLED), ``curves`` training run id -> [(step, train_loss)], ``images`` trial
    name -> the sample grid's PNG bytes."""

    sweep: str
    experiment_id: str
    parent_run_id: str
    status: str
    varying: list[str]
    planned: int  # trials in the sweep
    records: list[TrialRecord]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    training_names: dict[str, str] = field(default_factory=dict)
    images: dict[str, bytes] = field(default_factory=dict)
    tracking_uri: str = ""


def find_parent(client, name_or_id: str, key: str = "report"):
    """The parent run of a sweep: the run of id ``name_or_id``, else the latest parent run of the sweep (the MLflow
    experiment) named ``name_or_id``; a ConfigError under ``key`` naming the sweeps there when neither is found."""
    from mlflow.exceptions import MlflowException

    if RUN_ID.match(name_or_id):
        try:
            run = client.get_run(name_or_id)
        except MlflowException:
            run = None
        if run is not None:
            if PARENT_TAG in run.data.tags:
                raise ConfigError(key, name_or_id, "a sweep's name or its parent run's id",
                                  detail=f"run {name_or_id} is a trial's run; its parent run is "
                                         f"{run.data.tags[PARENT_TAG]}")
            return run
    experiment = client.get_experiment_by_name(name_or_id)
    if experiment is not None:
        runs = client.search_runs([experiment.experiment_id], "", order_by=["attributes.start_time DESC"],
                                  max_results=200)
        parents = [r for r in runs if PARENT_TAG not in r.data.tags]
        if parents:
            return parents[0]
    names = sorted(e.name for e in client.search_experiments() if e.name != "Default")
    raise ConfigError(key, name_or_id, f"a sweep's name ({', '.join(names) or 'none recorded'}) or its parent run's id",
                      detail=f"no sweep or parent run of that name or id in {getattr(client, 'tracking_uri', '')}")


def collect(client, parent_run_id: str, trials: Optional[list] = None, images: bool = True) -> SweepResults:
    """The sweep of parent run ``parent_run_id`` as recorded. ``trials``: the sweep's ``Trial``s when known (their
    order kept, those without a run listed KILLED "never started"; else the recorded ones by name); ``images``: fetch the sample grids."""
    parent = client.get_run(parent_run_id)
    experiment_id = parent.info.experiment_id
    runs = client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=10_000,
                              order_by=["attributes.start_time ASC"])
    varying = [v for v in parent.data.tags.get("varying", "").split(",") if v]
    evaluations = {r.data.tags.get("trial"): r for r in runs if r.data.tags.get(STAGE_TAG) != TRAIN}
    training = {r.info.run_id: r for r in runs if r.data.tags.get(STAGE_TAG) == TRAIN}
    names = [t.name for t in trials] if trials is not None else sorted(evaluations)
    records = [_record(evaluations.get(name), name, varying) for name in names]
    results = SweepResults(parent.data.tags.get("sweep", parent.info.run_name), experiment_id, parent_run_id,
                           parent.info.status, varying, int(parent.data.tags.get("trials", len(records))), records,
                           tracking_uri=getattr(client, "tracking_uri", ""))
    for record in records:
        run = training.get(record.training_run_id)
        if run is None and record.training_run_id:
            run = _get(client, record.training_run_id)
        if run is not None and run.info.run_id not in results.curves:
            history = client.get_metric_history(run.info.run_id, "train_loss")
            results.curves[run.info.run_id] = [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)]
            results.training_names[run.info.run_id] = run.info.run_name
    if images:
        results.images = _sample_images(client, records)
    return results


def _record(run, name: str, varying: list[str]) -> TrialRecord:
    if run is None:
        return TrialRecord(name, name, None, "KILLED", error="never started")
    params, tags = run.data.params, run.data.tags
    axes = {key: params.get(key) for key in varying if key != "variant"}
    seed = params.get(SEED_AXIS)
    eval_seconds = (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else None
    status, error = run.info.status, tags.get(FAILURE_TAG, "")
    if STOPPED_TAG in tags:  # by the sweep's scheduler (orchestrator.scheduler): trained part of the way, not evaluated
        status, eval_seconds = "STOPPED", None
        error = stopped_line({"by": tags[STOPPED_TAG], "step": tags.get(STOPPED_STEP_TAG)}, params.get("train.steps"))
    return TrialRecord(
        name=name, variant=variant_label(tags.get("variant", name), axes), seed=int(seed) if seed else None,
        status=status, metrics=dict(run.data.metrics), error=error,
        run_id=run.info.run_id, training_run_id=tags.get(TRAINING_RUN_TAG, ""),
        train_seconds=run.data.metrics.get("train_seconds"), eval_seconds=eval_seconds, axes=axes, params=dict(params),
        skipped={k[: -len(".skipped")]: v for k, v in tags.items() if k.endswith(".skipped")})


def _get(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def _sample_images(client, records: list[TrialRecord]) -> dict[str, bytes]:
    """Each trial's sample grid (``samples.png``), for the trials that logged one."""
    out = {}
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in the summary
    with tempfile.TemporaryDirectory() as directory:
        for record in records:
            if not record.run_id or SAMPLES_IMAGE not in {a.path for a in client.list_artifacts(record.run_id)}:
                continue
            path = client.download_artifacts(record.run_id, SAMPLES_IMAGE, os.path.join(directory, record.run_id))
            with open(path, "rb") as handle:
                out[record.name] = handle.read()
    return out
