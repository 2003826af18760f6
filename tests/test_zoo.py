"""The zoo sweeps (every accepted value, every degradation and guidance) and train-once-evaluate-many, end to end
with real Ray and a real MLflow tracking server on loopback (split from test_orchestrator.py so that the two
pytest-xdist workers of `make test` share the long sweeps)."""
import math
import os

import pytest
import yaml
from mlflow.tracking import MlflowClient

from test_orchestrator import ROOT, SMOKE, all_runs, child_runs, orchestrator, training_run_of

pytestmark = pytest.mark.integration


def test_zoo_smoke_trains_and_samples_every_value(tmp_path, server, cache_dir):
    """sweeps/zoo_smoke.yaml (which test_sweepfile checks covers every accepted value) runs to completion:
    every trial FINISHED with finite samples, its sample grid, and the learned schedule where there is one."""
    from orchestrator.sweepfile import load_sweep

    path = os.path.join(ROOT, "sweeps", "zoo_smoke.yaml")
    result = orchestrator(["sweep", path, f"base.eval.cache_dir={cache_dir}"], cwd=tmp_path,
                          env_extra={"MLFLOW_TRACKING_URI": server.uri}, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(server.uri)
    _, children = child_runs(client, "zoo_smoke")
    expected = {t.name for t in load_sweep(path).trials}
    assert {r.data.tags["trial"] for r in children} == expected
    for run in children:
        assert run.info.status == "FINISHED", run.data.tags.get("failure_reason")
        assert run.data.tags["samples_finite"] == "True"
        assert run.data.metrics["fid"] > 0 and run.data.metrics["sample_nfe"] >= 1
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"samples.png", "config.yaml"} <= artifacts
        trained = {a.path for a in client.list_artifacts(training_run_of(client, run).info.run_id)}
        assert "ema.pt" in trained
        assert ("schedule.json" in trained) == (run.data.params["process.schedule"] == "learned")
        # bits/dim for every process, discrete ones (and the learned schedule) included
        assert math.isfinite(run.data.metrics["bpd_ode"]) and run.data.metrics["bpd_ode_nfe"] >= 2
        discrete = run.data.params["process.T"] != "continuous"
        assert ("bpd_elbo" in run.data.metrics) == discrete == ("elbo_terms.json" in artifacts)


def test_beyond_smoke_runs_every_degradation_sampler_and_guidance(tmp_path, server, cache_dir):
    """sweeps/beyond_smoke.yaml covers every degradation and cold sampler, every blur schedule and both guidance
    methods, and runs to completion: naive, cold and blur runs say why they have no bits/dim, guided runs log the
    per-class metrics and the classifier-free one counts two network evaluations per step."""
    from diffusion.blur import BLUR_SCHEDULES
    from diffusion.inverse import INVERSE_SOLVERS, MASKS
    from diffusion.degradations import COLD_SAMPLERS, DEGRADATIONS
    from orchestrator.sweepfile import load_sweep

    path = os.path.join(ROOT, "sweeps", "beyond_smoke.yaml")
    configs = [t.config for t in load_sweep(path).trials]
    covered = {c.process.degradation for c in configs if c.process.name == "cold"} | {
        c.process.name for c in configs if c.process.name == "naive"}
    assert covered == set(DEGRADATIONS.names())
    assert {c.sample.sampler for c in configs if c.process.name in ("naive", "cold")} == set(COLD_SAMPLERS.names())
    assert {c.process.blur_schedule for c in configs if c.process.name == "blur"} == set(BLUR_SCHEDULES.names())
    assert {c.eval.inverse_solver for c in configs if c.eval.inverse} == set(INVERSE_SOLVERS.names())
    assert {c.eval.inverse_mask for c in configs if "inpaint" in c.eval.inverse} == set(MASKS)
    result = orchestrator(["sweep", path, f"base.eval.cache_dir={cache_dir}"], cwd=tmp_path,
                          env_extra={"MLFLOW_TRACKING_URI": server.uri})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(server.uri)
    _, children = child_runs(client, "beyond_smoke")
    assert len(children) == len(configs)
    for run in children:
        assert run.info.status == "FINISHED", run.data.tags.get("failure_reason")
        assert run.data.tags["samples_finite"] == "True" and run.data.metrics["fid"] > 0
        restoration = run.data.params["process.name"] in ("naive", "cold", "blur") or run.data.params["model.latent"] == "True"
        assert ("bpd.skipped" in run.data.tags) == restoration and ("bpd_ode" in run.data.metrics) != restoration
        guided = run.data.tags["trial"].endswith("guidance")
        assert ("class_accuracy" in run.data.metrics) == guided == ("fid_class_mean" in run.data.metrics)
        if run.data.tags["trial"] in ("free_guidance", "blur_linear_guidance"):
            assert run.data.metrics["sample_nfe"] == 16  # 8 steps, two predictions each
        if run.data.tags["trial"] == "classifier_guidance":
            assert float(run.data.tags["guidance.classifier_accuracy_t0.1"]) > 0.1
        if run.data.tags["trial"] == "latent":  # the VAE stage's record, on the evaluation run and its training run
            assert run.data.tags["vae.latent_shape"] == "2x4x4" and run.data.metrics["vae_recon_mse"] > 0
            assert "vae_kl" in client.get_run(training_run_of(client, run).info.run_id).data.metrics
        stages = [s for s in ("inpaint", "denoise") if f"{s}_psnr" in run.data.metrics]
        if run.data.tags["trial"].startswith("inverse_"):  # 30 training steps: the numbers exist, not their quality
            assert stages and {f"{s}.png" for s in stages} <= {a.path for a in client.list_artifacts(run.info.run_id)}
            for stage in stages:
                assert math.isfinite(run.data.metrics[f"{stage}_psnr"]) and -1 <= run.data.metrics[f"{stage}_ssim"] <= 1
                assert run.data.tags[f"{stage}.solver"] == run.data.params["eval.inverse_solver"]
        else:
            assert not stages


def test_train_once_evaluate_many(tmp_path, server, cache_dir, s3):
    """2 samplers x 2 seeds train 2 models, not 4; each evaluation run links to its model's training run,
    and the held-out likelihood (sampler-independent) is computed once per model. Run again, the sweep
    trains nothing and evaluates on the cached models; with --no-cache it would train both again.
    The sweep's storage is an S3 bucket (a real S3 server on loopback): Tune's state and the model cache
    live there, and the credentials come from the environment."""
    from pyarrow import fs as pafs

    base = yaml.safe_load(open(SMOKE))
    sweep = {"name": "train_once", "base": base["base"], "storage": f"s3://{s3}/sweeps",
             "grid": {"sample.sampler": ["ancestral", "ddim"], "seed": [0, 1]}}
    sweep["base"].update(base["variants"]["ddpm"])
    sweep["base"]["eval"]["cache_dir"] = cache_dir
    path = tmp_path / "train_once.yaml"
    path.write_text(yaml.safe_dump(sweep))
    env = {"MLFLOW_TRACKING_URI": server.uri}
    bucket = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"].split("://")[1], scheme="http")

    def stored(prefix):
        found = bucket.get_file_info(pafs.FileSelector(f"{s3}/{prefix}", recursive=True, allow_not_found=True))
        return [info.path for info in found if info.type == pafs.FileType.File]

    dry = orchestrator(["sweep", str(path), "--dry-run"], cwd=tmp_path, env_extra=env)
    assert dry.returncode == 0 and "training: 2 model(s) to train, 0 reused from the cache" in dry.stdout
    assert "4 evaluation(s)" in dry.stdout and not stored("sweeps")  # a dry run writes nothing

    first = orchestrator(["sweep", str(path)], cwd=tmp_path, env_extra=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    client = MlflowClient(server.uri)
    _, training, evaluation = all_runs(client, "train_once")
    assert len(training) == 2 and len(evaluation) == 4
    by_seed = {}
    for run in evaluation:
        assert run.info.status == "FINISHED"
        by_seed.setdefault(run.data.params["seed"], []).append(run)
    for seed, runs in by_seed.items():
        assert sorted(r.data.params["sample.sampler"] for r in runs) == ["ancestral", "ddim"]
        models = {training_run_of(client, r).info.run_id for r in runs}
        assert len(models) == 1  # one model per seed, whatever the sampler
        assert client.get_run(models.pop()).data.params["seed"] == seed
        assert runs[0].data.metrics["fid"] != runs[1].data.metrics["fid"]  # different samplers, different samples
        # the likelihood does not depend on the sampler: computed once, by one of the two runs
        assert runs[0].data.metrics["bpd_ode"] == runs[1].data.metrics["bpd_ode"]
        assert runs[0].data.tags["bpd.computed_by_run"] == runs[1].data.tags["bpd.computed_by_run"]
        assert runs[0].data.tags["bpd.computed_by_run"] in {r.info.run_id for r in runs}
    assert {r.data.tags["training_hash"] for r in evaluation} == {r.data.tags["training_hash"] for r in training}
    models = stored("sweeps/models")
    for run in training:  # each model's entry is complete in the bucket
        key = run.data.tags["training_hash"]
        assert {f"{s3}/sweeps/models/{key}/{name}" for name in ("model.json", "ema.pt", "spec.json", "run.json")} <= set(models)
    assert any("train_once" in p for p in stored("sweeps")) and not (tmp_path / "ray_results").exists()

    again = orchestrator(["sweep", str(path)], cwd=tmp_path, env_extra=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "training: 0 model(s) to train, 2 reused from the cache" in again.stdout
    _, training_again, evaluation_again = all_runs(client, "train_once")
    assert {r.info.run_id for r in training_again} == {r.info.run_id for r in training}  # nothing retrained
    new = [r for r in evaluation_again if r.info.run_id not in {e.info.run_id for e in evaluation}]
    assert len(new) == 4 and all(r.info.status == "FINISHED" for r in new)
    assert {r.data.tags["training_run_id"] for r in new} == {r.info.run_id for r in training}

    # --no-cache plans to retrain every model (the invalidation itself: tests/test_cache.py)
    fresh = orchestrator(["sweep", str(path), "--dry-run", "--no-cache"], cwd=tmp_path, env_extra=env)
    assert fresh.returncode == 0 and "training: 2 model(s) to train, 0 reused from the cache" in fresh.stdout
