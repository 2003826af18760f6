"""A sweep's parent run in MLflow: the experiment, the parent run created or reopened (``--resume``), ended FAILED
when the sweep fails after it started (``parent_guard``)."""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

from diffusion.errors import ConfigError

from .sweepfile import Sweep
from .tracking import end_unfinished_runs
from .trial import FAILURE_TAG, STAGE_TAG


# The MLflow UI's experiment page as a researcher wants it: a model-training experiment (not a GenAI one), and a
# shared view per sweep run (``viewStateShareKey``) listing its evaluation runs with the metrics side by side.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_METRICS = ("fid", "fid_stderr", "fid_reference", "fid_inf", "kid", "kid_stderr", "bpd_ode", "bpd_ode_stderr",
                "bpd_elbo", "bpd_elbo_stderr", "sample_nfe", "train_seconds")


def create_experiment(client, name: str) -> str:
    """The new experiment's id; the existing one's when another sweep of the same name created it meanwhile."""
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, tags=EXPERIMENT_KIND)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def new_parent(client, experiment_id: str, sweep: Sweep, models: int, cached: int) -> str:
    """A new parent run for the sweep (its tags: the digest ``--resume`` looks for, the plan's model counts),
    with the sweep file as it was read; returns its id."""
    parent_id = client.create_run(
        experiment_id,
        run_name=f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={"sweep": sweep.name, "sweep_digest": sweep.digest(), "trials": str(len(sweep.trials)),
              "varying": ",".join(sweep.varying), "models": str(models), "models_cached": str(cached)},
    ).info.run_id
    client.log_dict(parent_id, sweep.source, "sweep.yaml")
    return parent_id


def view_key(parent_id: str) -> str:
    return f"sweep-{parent_id[:12]}"


def comparison_view(client, experiment_id: str, parent_id: str, sweep: Sweep) -> str:
    """The sweep run's shared view in the MLflow UI (an experiment tag the UI reads): its evaluation runs, with the
    variant, the varying axes and the metrics as columns, best FID first; returns the view's key."""
    import json

    axes = ["variant", *[a for a in sweep.varying if a != "variant"]]
    state = {"selectedColumns": [f"params.`{a}`" for a in axes] + [f"metrics.`{m}`" for m in VIEW_METRICS],
             "searchFilter": f"tags.stage = 'evaluate' and tags.`mlflow.parentRunId` = '{parent_id}'",
             "orderByKey": "metrics.`fid`", "orderByAsc": True}
    key = view_key(parent_id)
    client.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + key, json.dumps(state))
    for tag, value in EXPERIMENT_KIND.items():  # experiments created before the tag existed
        client.set_experiment_tag(experiment_id, tag, value)
    return key


def view_url(base: str, experiment_id: str, parent_id: str) -> str:
    """The UI's address of the sweep run's comparison view, on the server at ``base``."""
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={view_key(parent_id)}")


def reopen_parent(client, experiment, sweep: Sweep) -> str:
    """The latest unfinished parent run of this sweep (``resumable_parent``) set RUNNING again, its ``resumed``
    tag counting the resumptions; returns its id."""
    parent = resumable_parent(client, experiment, sweep)
    client.update_run(parent.info.run_id, status="RUNNING")
    client.set_tag(parent.info.run_id, "resumed", str(int(parent.data.tags.get("resumed", "0")) + 1))
    return parent.info.run_id


def resumable_parent(client, experiment, sweep: Sweep):
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


def finished_trials(client, experiment_id: str, parent_id: str) -> set[str]:
    """The trials whose evaluation run under this parent run finished."""
    runs = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                              f"tags.{STAGE_TAG} = 'evaluate' and attributes.status = 'FINISHED'", max_results=10_000)
    return {run.data.tags["trial"] for run in runs}


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
