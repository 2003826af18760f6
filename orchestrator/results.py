"""A finished sweep in a notebook, with no tracking server running: its results as a DataFrame, its artifacts as
local files, its models ready to sample from.

    from orchestrator.results import artifact_path, load_model, results
    df = results("ddpm_vs_ncsn")                     # one row per trial: run ids, params, metrics
    model = load_model(df.run_id[0])                 # diffusion.pretrained.TrainedModel
    x = model.sample(16)                             # the trial's sampler; model.sample(16, steps=50) overrides
    path = artifact_path(df.run_id[0], "samples.png")

The tracking store is the ``tracking_uri`` argument, else ``MLFLOW_TRACKING_URI``, else the local store a sweep
without ``MLFLOW_TRACKING_URI`` wrote in the working directory: ``sqlite:///mlflow.db``, which MLflow's client
reads directly (``orchestrator.tracking.LocalServer`` is only needed while a sweep writes). Artifacts of runs
logged through that local server have ``mlflow-artifacts:`` URIs, which only a server resolves:
:func:`artifact_path` maps them to ``mlartifacts/`` beside ``mlflow.db`` (the server's
``--artifacts-destination``), and downloads through the client only from a remote store.

Models come from the model cache (``<storage>/models/<training hash>``, ``orchestrator.cache``; ``storage``
default ``ray_results`` beside ``mlflow.db``, the sweep file's default), checksums verified; when the entry is not
there, from the training run's ``ema.pt`` artifact.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Optional
from urllib.parse import unquote, urlsplit

import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from diffusion.guidance import build_noisy_classifier
from diffusion.latent import build_vae
from diffusion.pretrained import TrainedModel, load_trained
from diffusion.registry import options_for

from .cache import MODEL_FILE, ModelCache, is_uri
from .collect import RUN_ID, find_parent
from .keys import classifier_spec, vae_spec
from .schema import SweepTrialConfig
from .tracking import PARENT_TAG

LOCAL_STORE = "mlflow.db"  # what a sweep without MLFLOW_TRACKING_URI writes in its working directory
DEFAULT_STORAGE = "ray_results"  # the sweep file's default storage, beside mlflow.db
ACCEPTED_SOURCE = ("an MLflow run id (a training or an evaluation run) or a model-cache path "
                   "(<storage>/models/<training hash>, or a file in it)")


def resolve_tracking_uri(tracking_uri: Optional[str] = None) -> str:
    """``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``. FileNotFoundError for a
    SQLite store whose file does not exist (MLflow would create an empty one)."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + os.path.abspath(LOCAL_STORE)
    database = _sqlite_file(uri)
    if database is not None and not os.path.isfile(database):
        raise FileNotFoundError(f"tracking store {uri!r}: {database} does not exist; accepted: tracking_uri=, "
                                "MLFLOW_TRACKING_URI, or a working directory holding a sweep's mlflow.db")
    return uri


def _sqlite_file(uri: str) -> Optional[str]:
    return os.path.abspath(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def _client(tracking_uri: Optional[str]) -> tuple[MlflowClient, str]:
    uri = resolve_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri), uri


def _get_run(client: MlflowClient, run_id: str, uri: str, what: str = "run_id"):
    try:
        return client.get_run(run_id)
    except MlflowException as error:
        raise ValueError(f"{what}: no run {run_id!r} in {uri} ({str(error)[:120]}); accepted: {ACCEPTED_SOURCE}") \
            from None


def _value(text: Optional[str]) -> Any:
    """An MLflow param (a string) as the value it was: int, float, bool, None or list where it reads as one."""
    if text is None or text == "None":
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (int, float, bool, list)) else text


# ---------------------------------------------------------------------------------------------------------------
# results


def _search(client: MlflowClient, experiment_id: str, filter_string: str = "") -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def results(sweep: str, tracking_uri: Optional[str] = None):
    """The evaluation runs of a sweep as a pandas DataFrame, one row per trial (sorted by trial name): ``run_id``,
    ``trial``, ``variant``, ``status``, ``training_run_id``, ``training_hash``, ``parent_run_id``, then every param
    (the flattened trial config: ``seed``, ``sample.sampler``, ...; numbers as numbers) and every metric (``fid``,
    ``fid_stderr``, ``kid``, ``kid_stderr``, ``bpd_ode``, ...; missing ones NaN). ``sweep``: the sweep's name (its
    latest invocation, the parent run started last) or a parent run's id. Reads the tracking store directly: no
    server needed for the local ``mlflow.db``."""
    import pandas as pd

    from .trial import EVALUATE, STAGE_TAG, TRAINING_HASH_TAG, TRAINING_RUN_TAG

    client, uri = _client(tracking_uri)
    parent = find_parent(client, sweep, key="sweep")
    runs = [r for r in _search(client, parent.info.experiment_id, f"tags.{PARENT_TAG} = '{parent.info.run_id}'")
            if r.data.tags.get(STAGE_TAG) == EVALUATE]
    rows = []
    for run in runs:
        tags = run.data.tags
        row = {"run_id": run.info.run_id, "trial": tags.get("trial"), "variant": tags.get("variant"),
               "status": run.info.status, "training_run_id": tags.get(TRAINING_RUN_TAG),
               "training_hash": tags.get(TRAINING_HASH_TAG), "parent_run_id": parent.info.run_id}
        row.update({k: _value(v) for k, v in sorted(run.data.params.items()) if k not in row})
        row.update(run.data.metrics)
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.sort_values("trial", ignore_index=True) if rows else frame


# ---------------------------------------------------------------------------------------------------------------
# artifacts


def artifact_path(run_id: str, name: str, tracking_uri: Optional[str] = None) -> str:
    """A local file holding the artifact ``name`` of run ``run_id``: for the local store, the file under
    ``mlartifacts/`` beside ``mlflow.db`` (or the run's file artifact root); for a remote store, downloaded through
    the client into a temporary directory. FileNotFoundError naming the run, the artifact and the ones it has."""
    client, uri = _client(tracking_uri)
    run = _get_run(client, run_id, uri)
    root = urlsplit(run.info.artifact_uri)
    base = None
    if root.scheme == "mlflow-artifacts" and _sqlite_file(uri):
        base = os.path.join(os.path.dirname(_sqlite_file(uri)), "mlartifacts", unquote(root.path).lstrip("/"))
    elif root.scheme in ("", "file"):
        base = unquote(root.path)
    if base is None:  # a remote store: through its server
        try:
            return client.download_artifacts(run_id, name, tempfile.mkdtemp(prefix="artifact-"))
        except MlflowException as error:
            raise FileNotFoundError(f"name: run {run_id} has no artifact {name!r} in {uri} ({str(error)[:120]})") \
                from None
    path = os.path.join(base, name)
    if not os.path.isfile(path):
        held = sorted(os.listdir(base)) if os.path.isdir(base) else []
        raise FileNotFoundError(f"name: run {run_id} has no artifact {name!r} ({path} does not exist); accepted: "
                                f"{', '.join(held) or 'none: the run has no artifacts here'}")
    return path


# ---------------------------------------------------------------------------------------------------------------
# models


def _config(sections: dict, sample: Optional[dict]) -> SweepTrialConfig:
    sections = {k: v for k, v in sections.items() if k != "version"}
    if sample:
        sections = {**sections, "sample": {**(sections.get("sample") or {}), **sample}}
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SweepTrialConfig), sections))


def _entry(path: str) -> tuple[ModelCache, str]:
    """(the cache, the key) of a model-cache path: an entry directory or a file in it."""
    entry = os.path.abspath(path if os.path.isdir(path) else os.path.dirname(path))
    if not os.path.isfile(os.path.join(entry, MODEL_FILE)):
        raise ValueError(f"source: {path!r} is not in a complete model-cache entry ({entry} holds no {MODEL_FILE}); "
                         f"accepted: {ACCEPTED_SOURCE}")
    return ModelCache(os.path.dirname(entry)), os.path.basename(entry)


def _cached_module(cache: ModelCache, prefix: str, spec: dict, build):
    """A VAE or guidance classifier the evaluation kept in the cache (``orchestrator.stages.cached_stage``), or
    None when the cache does not hold it."""
    import torch

    from .stages import stage_entry

    entry = stage_entry(prefix, spec)
    record = cache.read(entry, f"{prefix}.json")
    if record is None or cache.verify(entry, f"{prefix}.pt", (record.get("files") or {}).get(f"{prefix}.pt")):
        return None
    module = build(record)
    module.load_state_dict(torch.load(cache.fetch(entry, f"{prefix}.pt"), map_location="cpu", weights_only=True))
    return module


def _trained(cfg: SweepTrialConfig, cache: ModelCache, key: str, weights: str, device, source: str) -> TrainedModel:
    vae = classifier = None
    if cfg.model.latent:
        from diffusion.data import load_dataset

        renames = {"channels": "vae_channels"}
        shape = load_dataset(cfg.data).shape
        vae = _cached_module(cache, "vae", vae_spec(cfg), lambda r: build_vae(shape, **options_for(build_vae, cfg.model,
                                                                                                   renames)))
        if vae is None:
            raise FileNotFoundError(f"the latent model {key}'s VAE is not in the model cache {cache.root}")
    if cfg.sample.classifier_scale:
        classifier = _cached_module(cache, "classifier", classifier_spec(cfg),
                                    lambda r: build_noisy_classifier(r["shape"], r["num_classes"]))
    return load_trained(cfg, weights, vae=vae, classifier=classifier, device=device, amp=cfg.resources.amp,
                        source=source)


def _from_run(client: MlflowClient, uri: str, run_id: str, storage: Optional[str],
              sample: Optional[dict]) -> tuple[SweepTrialConfig, ModelCache, str, str, str]:
    """(config, cache, key, weights file, source) of a training or evaluation run."""
    from .trial import EVALUATE, MODEL_CACHE_TAG, STAGE_TAG, TRAIN, TRAINING_HASH_TAG, TRAINING_RUN_TAG

    run = _get_run(client, run_id, uri, "source")
    tags = run.data.tags
    if tags.get(STAGE_TAG) not in (TRAIN, EVALUATE):
        raise ValueError(f"source: run {run_id!r} is neither a training nor an evaluation run (tag {STAGE_TAG}: "
                         f"{tags.get(STAGE_TAG)!r}); accepted: {ACCEPTED_SOURCE}")
    key = tags[TRAINING_HASH_TAG]
    training_run = run_id if tags[STAGE_TAG] == TRAIN else tags[TRAINING_RUN_TAG]
    evaluation = run_id if tags[STAGE_TAG] == EVALUATE else None
    if evaluation is None:  # a training run: the sampler of the first trial evaluated on it, if recorded
        first = (tags.get("trials") or "").split(",")[0]
        linked = _search(client, run.info.experiment_id, f"tags.{TRAINING_RUN_TAG} = '{run_id}'")
        linked = sorted(linked, key=lambda r: (r.data.tags.get("trial") != first, r.info.start_time))
        evaluation = linked[0].info.run_id if linked else None
    with open(artifact_path(evaluation or training_run, "config.yaml", uri), encoding="utf-8") as handle:
        cfg = _config(yaml.safe_load(handle), sample)
    if storage is not None:
        cache = ModelCache(f"{storage.rstrip('/')}/models" if is_uri(storage) else os.path.join(storage, "models"))
    elif tags.get(MODEL_CACHE_TAG):  # where the sweep kept it
        cache = ModelCache(tags[MODEL_CACHE_TAG])
    else:  # runs recorded before the tag: the default storage beside the store
        database = _sqlite_file(uri)
        storage = os.path.join(os.path.dirname(database) if database else os.getcwd(), DEFAULT_STORAGE)
        cache = ModelCache(os.path.join(storage, "models"))
    if cache.model(key) is not None:
        return cfg, cache, key, cache.fetch(key, "ema.pt"), f"cache entry {key} of run {run_id}"
    return cfg, cache, key, artifact_path(training_run, "ema.pt", uri), f"ema.pt of training run {training_run}"


def load_model(source: str, *, tracking_uri: Optional[str] = None, storage: Optional[str] = None,
               device: Optional[str] = None, sample: Optional[dict] = None) -> TrainedModel:
    """A trained model ready to sample from (``diffusion.pretrained.TrainedModel``: ``.sample(n, steps=,
    sampler=, seed=)``, ``.network``, ``.cfg``, ``.data``, ``.image(samples)``), from ``source``:

    - an MLflow run id: an evaluation run gives its trial's config (its ``config.yaml``: the trial's sampler);
      a training run, the config of the first trial evaluated on it. The weights are the model-cache entry of its
      tag ``training_hash`` in the model cache under ``storage`` (a sweep's ``storage`` key; default: where the
      sweep kept it, the run's tag ``model_cache``, and for runs without it ``ray_results`` beside the tracking
      store's ``mlflow.db``, else in the working directory), checksums verified, or else the training run's
      ``ema.pt`` artifact. The store: ``tracking_uri``, ``$MLFLOW_TRACKING_URI``, ``sqlite:///mlflow.db``.
    - a model-cache path (``<storage>/models/<hash>`` or a file in it): the entry's ``spec.json`` (the training
      config) with the sample section's defaults, and its verified ``ema.pt``; no tracking store is read.

    ``sample``: overrides of the sample section (``{"steps": 50}``), kept as the model's default; ``device``:
    default ``auto``. A latent model's VAE and classifier guidance's classifier come from the cache. ValueError
    naming a ``source`` that is neither, FileNotFoundError for weights that are nowhere."""
    text = os.fspath(source)
    if os.path.exists(text) and not RUN_ID.match(text):  # a bare run id is a run even where a file has its name
        cache, key = _entry(text)
        if cache.model(key) is None:
            raise ValueError(f"source: the model-cache entry {os.path.join(cache.root, key)} is damaged (a file does "
                             f"not match its checksum; see the warning); accepted: {ACCEPTED_SOURCE}")
        cfg = _config(cache.read(key, "spec.json"), sample)
        return _trained(cfg, cache, key, cache.fetch(key, "ema.pt"), device, f"cache entry {key}")
    client, uri = _client(tracking_uri)
    cfg, cache, key, weights, where = _from_run(client, uri, str(source), storage, sample)
    return _trained(cfg, cache, key, weights, device, where)

