"""What an evaluation keeps in the model cache besides the model: the VAE of latent diffusion, the noise-conditional
classifier of classifier guidance (each a small network trained once, :func:`cached_stage`) and the held-out
likelihood of a model (:func:`likelihood_memo`); and FID's feature extractor and reference features, prepared once
under the cache's lock, by a Ray task of their own or the first evaluation that needs them (:func:`fid_features`). ``orchestrator.trial`` hands them to
``diffusion.evaluation.evaluate``; their records are logged on the run that uses them."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import time
from typing import Callable, Optional

import torch
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from diffusion.data import load_dataset
from diffusion.errors import ConfigError
from diffusion.guidance import build_noisy_classifier, fit_noisy_classifier
from diffusion.latent import build_vae, fit_vae, latent_dataset
from diffusion.registry import options_for
from diffusion.storage import save_atomic

from .cache import ModelCache, likelihood_key, warn_damaged
from .keys import classifier_spec, vae_spec
from .schema import SweepTrialConfig


def model_data(cfg: SweepTrialConfig, cache: ModelCache, client: MlflowClient, run_id: str, device):
    """(the data the diffusion model sees, the data set, the VAE or None): for ``model.latent`` the VAE's codes
    (``diffusion.latent.latent_dataset``), else the data set itself."""
    dataset = load_dataset(cfg.data)
    if not cfg.model.latent:
        return dataset, dataset, None
    vae = vae_stage(cfg, dataset, cache, client, run_id, device)
    return latent_dataset(dataset, vae), dataset, vae


def stage_entry(prefix: str, spec: dict) -> str:
    """The model-cache entry of a cached stage: ``<prefix>-<hash of spec>``."""
    return f"{prefix}-" + hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_stage(cache: ModelCache, prefix: str, spec: dict, run_id: str, fit: Callable[[], tuple],
                 build: Callable[[dict], torch.nn.Module], device, seconds_key: str) -> tuple:
    """A small network trained once per ``spec`` and kept in the model cache as ``<prefix>-<hash>``: the first
    caller trains it (``fit() -> (module, record)``) under the entry's lock and stores ``<prefix>.pt`` and
    ``<prefix>.json`` (the record, its training time under ``seconds_key``, the run that computed it and the spec);
    later callers load it into ``build(record)``. The record holds the checksum of ``<prefix>.pt`` (``files``); a
    weights file that does not match it, or does not load, is reported and the network trained again. Returns
    (module in eval mode, record, entry)."""
    entry = stage_entry(prefix, spec)
    weights = f"{prefix}.pt"
    with cache.lock(entry, prefix, note=f"run {run_id}"):
        record = cache.read(entry, f"{prefix}.json")
        module = None
        if record is not None:
            problem = cache.verify(entry, weights, (record.get("files") or {}).get(weights))
            if problem is None:
                try:
                    module = build(record).to(device)
                    state = torch.load(cache.fetch(entry, weights), map_location=device, weights_only=True)
                    module.load_state_dict(state)
                except Exception as error:  # noqa: BLE001 - damaged in a way its record cannot tell (no checksum)
                    module, problem = None, f"cannot be loaded: {type(error).__name__}: {str(error)[:200]}"
            if problem is not None:
                warn_damaged(entry, weights, problem, "training it again")
        if module is None:
            started = time.perf_counter()
            module, record = fit()
            record = {**record, seconds_key: time.perf_counter() - started, "computed_by_run": run_id, "spec": spec}
            save_atomic({k: v.detach().cpu() for k, v in module.state_dict().items()}, cache.local(entry, weights))
            record["files"] = {weights: cache.publish_file(entry, weights)}
            cache.write(entry, f"{prefix}.json", record)
    return module.eval(), record, entry


def vae_stage(cfg: SweepTrialConfig, dataset, cache: ModelCache, client: MlflowClient, run_id: str, device):
    """The VAE of latent diffusion, trained once per data set, latent options, batch size and seed and kept in the
    model cache (``vae-<hash>``, :func:`cached_stage`): the first training that needs it trains it, later
    trainings and evaluations load it. Its reconstruction and KL on the test split are logged to the run as
    metrics, with tags naming the entry and the run that trained it. ConfigError when ``model.latent_factor`` does
    not divide the image size."""
    shape, factor = dataset.shape, cfg.model.latent_factor
    if shape[-1] % factor or shape[-2] % factor:
        raise ConfigError("model.latent_factor", factor, f"a divisor of the image size {shape[-2]}x{shape[-1]}")
    renames = {"channels": "vae_channels", "steps": "vae_steps", "kl_weight": "vae_kl_weight", "lr": "vae_lr"}
    options = options_for(fit_vae, cfg.model, renames, seed=cfg.seed, batch_size=cfg.train.batch_size)
    vae, record, entry = cached_stage(cache, "vae", vae_spec(cfg), run_id, lambda: fit_vae(dataset, device, **options),
                                      lambda record: build_vae(shape, **options_for(build_vae, cfg.model, renames)),
                                      device, "vae_train_seconds")
    client.log_batch(run_id, metrics=[Metric(k, float(v), int(time.time() * 1000), 0) for k, v in record.items()
                                      if k.startswith("vae_")],
                     tags=[RunTag("vae.entry", entry), RunTag("vae.computed_by_run", record["computed_by_run"]),
                           RunTag("vae.latent_shape", "x".join(map(str, record["latent_shape"]))),
                           RunTag("vae.scale", f"{record['scale']:.4f}")])
    return vae


def guidance_classifier(cfg: SweepTrialConfig, dataset, trainer, cache: ModelCache, client: MlflowClient,
                        run_id: str) -> torch.nn.Module:
    """The noise-conditional classifier of classifier guidance, trained once per data set, process, step count
    and seed and kept in the model cache (``classifier-<hash>``, :func:`cached_stage`): the first evaluation that
    needs it trains it, later ones load it. Its test accuracy at three noise levels is tagged. (Training it draws
    from its own seeded generator, building it under a forked global RNG: the evaluation's draws do not depend on
    whether it was trained or loaded, nor on when.)"""
    classifier, record, entry = cached_stage(
        cache, "classifier", classifier_spec(cfg), run_id,
        lambda: fit_noisy_classifier(dataset, trainer.process, trainer.device, seed=cfg.seed,
                                     steps=cfg.sample.classifier_steps),
        lambda record: build_noisy_classifier(record["shape"], record["num_classes"]), trainer.device, "train_seconds")
    tags = {"guidance.classifier": entry, "guidance.classifier_computed_by_run": record["computed_by_run"]}
    tags.update({f"guidance.classifier_{k}": f"{v:.4f}" for k, v in record.items() if k.startswith("accuracy_")})
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    return classifier


def likelihood_memo(cfg: SweepTrialConfig, key: str, cache: ModelCache, run_id: str) -> Callable[[Callable[[], dict]], dict]:
    """The ``likelihood`` memo of ``diffusion.evaluation.evaluate``: bits/dim of held-out data under the model of
    ``key`` computed once per model and likelihood settings. The first evaluation computes it (the others wait on
    the lock) and later ones read it from the cache. The tag ``bpd.computed_by_run`` names the run that computed
    it; ``bpd_seconds`` is its time there."""

    def memo(compute: Callable[[], dict]) -> dict:
        name = f"likelihood-{likelihood_key(cfg)}"
        with cache.lock(key, name):
            stored = cache.read(key, f"{name}.json")
            if stored is None:
                stored = compute()
                stored = {**stored, "tags": {**stored["tags"], "bpd.computed_by_run": run_id}}
                cache.write(key, f"{name}.json", stored)
        return stored

    return memo


FID_RECORD = "fid.json"


def fid_spec(cfg: SweepTrialConfig) -> Optional[dict]:
    """What FID's preparation depends on (the data set, the extractor and its training steps, the reference, the
    cache directory of both, ``eval.download``), or None when the trial measures no FID."""
    if not cfg.eval.fid:
        return None
    e = cfg.eval
    return {"data": dataclasses.asdict(cfg.data), "extractor": e.extractor, "classifier_steps": e.classifier_steps,
            "reference": e.reference, "reference_split": e.reference_split,
            "cache_dir": os.path.abspath(os.path.expanduser(e.cache_dir)), "download": e.download}


def fid_work_ahead(cfg: SweepTrialConfig, dataset) -> bool:
    """Whether preparing FID for ``cfg`` can take long enough to be worth a Ray task of its own, started ahead: the
    ``classifier`` extractor (``auto`` resolved) not trained yet in ``eval.cache_dir`` (a minute or more), or
    clean-fid's files to fetch (``eval.download``). Loading what is on disk takes seconds: the evaluations do it."""
    from diffusion.metrics import classifier_path, resolve_extractor

    if resolve_extractor(cfg.eval.extractor, dataset) == "classifier":
        return not os.path.exists(classifier_path(dataset, classifier_steps=cfg.eval.classifier_steps,
                                                  cache_dir=cfg.eval.cache_dir))
    return bool(cfg.eval.download)


def fid_features(cfg: SweepTrialConfig, dataset, cache: ModelCache, who: str) -> dict:
    """FID's feature extractor (e.g. the ``classifier`` trained on the digits, minutes on a cold cache) and the
    reference features, trained or extracted once into ``eval.cache_dir`` and loaded by everyone after: under the lock
    of the model cache's entry ``fid-<hash of fid_spec>`` (so two evaluations never both train it: the later one
    waits, then loads). Who did it (``who``: the driver's Ray task, or an evaluation run that got there first) is
    recorded in the entry (``fid.json``: {"prepared_by", "host", "pid", "extractor", "trained", "seconds",
    "summary"}) by the first to hold the lock, and again by whoever trains the extractor; the record is returned."""
    from diffusion.evaluation import check_fid
    from diffusion.metrics import REFERENCES, get_extractor, load_published_stats, reference_features

    entry = stage_entry("fid", fid_spec(cfg))
    with cache.lock(entry, "fid", note=who):
        started = time.perf_counter()
        check_fid(dataset, cfg)
        name, extract, info = get_extractor(cfg.eval.extractor, dataset,
                                            **options_for(get_extractor, cfg.eval, device=torch.device("cpu")))
        published = REFERENCES.get(cfg.eval.reference)
        if published is None:
            reference_features(dataset, cfg.eval.reference_split, name, extract, info, cfg.eval.cache_dir)
            reference = f"the {cfg.eval.reference_split} split's features"
        else:
            stats = load_published_stats(published, cfg.eval.cache_dir, download=cfg.eval.download)
            reference = f"{published.label} from {stats.path}"
        record = cache.read(entry, FID_RECORD)
        trained = name == "classifier" and not info.get("loaded_from_cache", True)
        if record is None or trained:
            seconds = time.perf_counter() - started
            where = f"{who} ({socket.gethostname()}:{os.getpid()})"
            summary = (f"{name} extractor {'trained' if trained else 'loaded'} by {where} in {seconds:.0f} s"
                       + (f", test accuracy {info['accuracy']:.4f}" if "accuracy" in info else "")
                       + f"; reference: {reference}")
            record = {"prepared_by": who, "host": socket.gethostname(), "pid": os.getpid(), "extractor": name,
                      "trained": trained, "seconds": seconds, "summary": summary}
            cache.write(entry, FID_RECORD, record)
    return record


FID_TASK = "ray task"  # fid.json's prepared_by when the driver's Ray task prepared FID (``fid_task``)


def fid_task(trial: dict, cache_root: str, env: dict) -> dict:
    """The Ray task the driver starts for each FID preparation of a sweep (``runner.start_fid_tasks``):
    :func:`fid_features` for the trial ``trial`` (``Trial.as_dict()``). ``env``: a joined cluster's credentials
    (the model cache on an object store), set in this worker's environment. Returns the entry's record."""
    from omegaconf import OmegaConf

    os.environ.update(env or {})
    torch.set_num_threads(1)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SweepTrialConfig), trial["config"]))
    return fid_features(cfg, load_dataset(cfg.data), ModelCache(cache_root), FID_TASK)
