"""diffusion.evaluation: what ``evaluate`` reports on real, tiny trained models (the moons with an MLP, the digits
with a class-conditional U-Net), that its numbers are the library's own computed directly, and that it is
deterministic."""
import pytest
import torch

from diffusion.config import (DataConfig, EvalConfig, ModelConfig, ProcessConfig, SampleConfig, TrainConfig,
                              TrialConfig)
from diffusion.data import load_dataset
from diffusion.evaluation import CONDITIONAL_NO_DROPOUT, ELBO_FILE, SAMPLES_IMAGE, Report, evaluate
from diffusion.training import build_trainer

CPU = torch.device("cpu")
TIMES = ("sample_seconds", "bpd_seconds", "inpaint_seconds", "denoise_seconds")  # wall-clock times differ per run


def moons_config(cache_dir: str, **sample) -> TrialConfig:
    return TrialConfig(
        data=DataConfig(name="moons", n_points=400),
        process=ProcessConfig(name="vp", schedule="linear", T=10),
        model=ModelConfig(arch="mlp", hidden=16, depth=2),
        train=TrainConfig(steps=20, batch_size=32, warmup=0, log_every=10),
        sample=SampleConfig(n=64, batch_size=64, grid=64, **sample),
        eval=EvalConfig(bpd_n=16, ode_rtol=1e-2, ode_atol=1e-2, cache_dir=cache_dir),
    )


def trained(cfg: TrialConfig):
    dataset = load_dataset(cfg.data)
    trainer = build_trainer(cfg, dataset, CPU)
    trainer.train()
    return trainer, dataset


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch and one BLAS thread (as tests/test_metrics.py): tiny networks and 128 x 128 matrix square roots
    gain nothing from two, and lose 10x when other processes share the cores. The counts are restored after."""
    import scipy.linalg  # noqa: F401  scipy's own OpenBLAS (sqrtm): threadpool_limits only limits loaded libraries
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def moons(tmp_path_factory):
    cfg = moons_config(str(tmp_path_factory.mktemp("points")))
    trainer, dataset = trained(cfg)
    return cfg, trainer, dataset


def digits_config(cache_dir: str, **model) -> TrialConfig:
    return TrialConfig(
        data=DataConfig(name="digits"),
        process=ProcessConfig(T=10),
        model=ModelConfig(channels=8, channel_mult=[1, 2], groups=4, attention=False, **model),
        train=TrainConfig(steps=5, batch_size=16, warmup=0, log_every=5),
        sample=SampleConfig(n=40, batch_size=40, grid=16),
        eval=EvalConfig(extractor="classifier", classifier_steps=20, kid=False, bpd=False, cache_dir=cache_dir),
    )


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return str(tmp_path_factory.mktemp("features"))


def measured(report: Report) -> dict:
    return {k: v for k, v in report.metrics.items() if k not in TIMES}


def test_points_report_fid_kid_bits_per_dim_and_the_scatter(moons):
    cfg, trainer, dataset = moons
    report = evaluate(trainer, dataset, cfg)
    assert report.step == trainer.step == 20
    assert {"sample_seconds", "sample_nfe", "fid", "fid_reference", "kid", "kid_reference", "bpd_ode", "bpd_elbo",
            "bpd_seconds", "fid_stderr", "fid_reference_stderr", "fid_inf", "fid_inf_reference", "kid_stderr",
            "kid_reference_stderr"} <= set(report.metrics)
    assert report.metrics["kid_stderr"] > 0 and report.metrics["kid_reference_stderr"] > 0
    assert "train_loss" not in report.metrics  # the training summary is the orchestrator's, from its cache
    assert report.metrics["sample_nfe"] == 10.0
    assert report.tags["samples_finite"] == "True"
    assert report.tags["fid.extractor"] == "raw" and report.tags["fid.n"] == "64"
    assert "bpd.skipped" not in report.tags and all(isinstance(v, str) for v in report.tags.values())
    assert set(report.images) == {SAMPLES_IMAGE} and report.images[SAMPLES_IMAGE].size == (400, 400)
    # a discrete process: the bound's terms per step; FID-infinity's fit for the samples and the held-out floor
    assert set(report.files) == {ELBO_FILE, "fid_inf.json"}
    fit = report.files["fid_inf.json"]
    assert fit["samples"]["fid_inf"] == report.metrics["fid_inf"] and fit["samples"]["counts"][-1] == 64
    assert fit["reference"]["fid_inf"] == report.metrics["fid_inf_reference"]


def test_evaluate_is_deterministic_and_reports_the_library_numbers(moons):
    from diffusion.metrics import compute_fid

    cfg, trainer, dataset = moons
    first, second = evaluate(trainer, dataset, cfg), evaluate(trainer, dataset, cfg)
    assert measured(first) == measured(second) and first.tags == second.tags and first.files == second.files
    assert list(first.images[SAMPLES_IMAGE].getdata()) == list(second.images[SAMPLES_IMAGE].getdata())
    samples, nfe = trainer.sample(cfg.sample.n, seed=cfg.seed + 1)  # the seed evaluate samples with
    direct = compute_fid(samples, dataset, cache_dir=cfg.eval.cache_dir, device=CPU)  # the eval section's defaults
    assert (first.metrics["fid"], first.metrics["kid"], first.metrics["sample_nfe"]) == (direct.fid, direct.kid, nfe)
    assert (first.metrics["fid_stderr"], first.metrics["fid_inf"]) == (direct.fid_stderr, direct.fid_inf.fid_inf)
    likelihood = trainer.heldout_likelihood()
    assert {k: first.metrics[k] for k in likelihood.metrics} == likelihood.metrics
    assert first.files[ELBO_FILE] == likelihood.elbo_curve


def test_likelihood_memo_is_asked_once_per_evaluation_and_its_value_reported(moons):
    """The orchestrator keeps the held-out likelihood in its model cache: evaluate hands it the computation and
    reports whatever it returns (computed, or stored by an earlier evaluation)."""
    cfg, trainer, dataset = moons
    cfg = moons_config(cfg.eval.cache_dir)
    cfg.eval.fid = False
    stored, calls = {}, []

    def memo(compute):
        calls.append(1)
        if not stored:
            stored.update(compute())
            stored["tags"] = {**stored["tags"], "bpd.computed_by_run": "run-1"}
        return stored

    first = evaluate(trainer, dataset, cfg, likelihood=memo)
    assert len(calls) == 1 and first.metrics["bpd_ode"] == stored["metrics"]["bpd_ode"]
    assert first.tags["bpd.computed_by_run"] == "run-1" and "fid" not in first.metrics
    stored["metrics"] = {**stored["metrics"], "bpd_ode": 123.0}  # the next evaluation reads the stored value
    second = evaluate(trainer, dataset, cfg, likelihood=lambda compute: stored)
    assert second.metrics["bpd_ode"] == 123.0 and second.files[ELBO_FILE] == stored["elbo_curve"]


def test_guidance_classifier_trained_by_evaluate_or_handed_in_gives_the_same_report(moons):
    """Without a classifier, evaluate trains the noise-conditional one itself at the point the orchestrator
    obtains it from its cache: the samples are the same either way (its training draws from its own generator)."""
    from diffusion.guidance import fit_noisy_classifier

    cfg, trainer, dataset = moons
    cfg = moons_config(cfg.eval.cache_dir, classifier_scale=1.0, classifier_steps=5)
    cfg.eval.bpd = False
    guided = build_trainer(cfg, dataset, CPU)
    guided.load_state_dict(trainer.state_dict())
    own = evaluate(guided, dataset, cfg)
    classifier = fit_noisy_classifier(dataset, guided.process, CPU, seed=cfg.seed, steps=cfg.sample.classifier_steps)[0]
    handed = evaluate(guided, dataset, cfg, classifier=classifier)
    assert measured(own) == measured(handed) and own.metrics["sample_nfe"] == 10.0
    plain = moons_config(cfg.eval.cache_dir)
    plain.eval.bpd = False
    assert own.metrics["fid"] != evaluate(trainer, dataset, plain).metrics["fid"]  # guidance did act


def test_class_conditional_images_class_metrics_and_bits_per_dim_skipped(features):
    """A class-conditional model without label dropout has no unconditional model, hence no bits/dim."""
    cfg = digits_config(features, class_conditional=True)
    cfg.eval.bpd = True
    trainer, dataset = trained(cfg)
    report = Report()
    assert evaluate(trainer, dataset, cfg, report=report) is report
    assert {"fid", "fid_reference", "class_accuracy", "class_accuracy_reference", "fid_class_mean",
            "fid_class_reference_mean"} <= set(report.metrics) and "kid" not in report.metrics
    assert report.tags["fid.extractor"] == "classifier" and "fid.classifier_accuracy" in report.tags
    assert report.tags["class_metrics.classes"] == "10"
    assert report.tags["bpd.skipped"] == CONDITIONAL_NO_DROPOUT
    assert not any(k.startswith("bpd") for k in report.metrics) and not report.files
    side = 4 * (4 * 9 + 1)  # 16 samples of 8x8, 4 a row, 1 pixel of padding, enlarged 4x
    assert set(report.images) == {SAMPLES_IMAGE} and report.images[SAMPLES_IMAGE].size == (side, side)
    assert report.images[SAMPLES_IMAGE].mode == "RGB"


def test_inverse_problems_report_their_metrics_tags_and_grids(features):
    cfg = digits_config(features)
    cfg.sample.grid, cfg.eval.fid = 0, False
    cfg.eval.inverse, cfg.eval.inverse_n = ["inpaint", "denoise"], 4
    trainer, dataset = trained(cfg)
    report = evaluate(trainer, dataset, cfg)
    for stage in ("inpaint", "denoise"):
        assert {f"{stage}_psnr", f"{stage}_ssim", f"{stage}_seconds"} <= set(report.metrics)
        assert report.tags[f"{stage}.solver"] == "replacement" and report.tags[f"{stage}.images"] == "4"
    assert report.tags["inpaint.measurement"] == "mask centre" and report.tags["denoise.measurement"] == "sigma_y 0.2"
    assert set(report.images) == {"inpaint.png", "denoise.png"}  # grid 0: no sample grid
    side = (4 * 9 + 1, 3 * 9 + 1)  # rows observed / restored / true of 4 images
    assert report.images["inpaint.png"].size == (4 * side[0], 4 * side[1])
    again = evaluate(trainer, dataset, cfg)  # the stages' seeds: the same restorations
    assert measured(again) == measured(report)


def test_a_failed_evaluation_leaves_what_it_measured_in_the_report(moons):
    """Non-finite samples: the grid and the tag ``samples_finite`` are in the caller's report, then FID fails."""
    cfg, trainer, dataset = moons
    broken = build_trainer(cfg, dataset, CPU)
    broken.load_state_dict(trainer.state_dict())
    with torch.no_grad():
        next(broken.ema.module.parameters()).fill_(float("nan"))
    report = Report()
    with pytest.raises(RuntimeError, match="FID cannot be computed"):
        evaluate(broken, dataset, cfg, report=report)
    assert report.tags == {"samples_finite": "False"} and set(report.images) == {SAMPLES_IMAGE}


def test_latent_samples_are_decoded_and_have_no_bits_per_dim(features):
    from diffusion.latent import LIKELIHOOD_NOTE, build_vae, latent_dataset

    cfg = digits_config(features, latent=True)
    cfg.eval.fid, cfg.eval.bpd, cfg.sample.n, cfg.sample.batch_size = False, True, 16, 8
    dataset = load_dataset(cfg.data)
    # untrained, with the config's latent options (the defaults): what is checked is that samples are decoded
    vae = build_vae(dataset.shape).eval()
    trainer = build_trainer(cfg, latent_dataset(dataset, vae), CPU)
    with pytest.raises(ValueError, match="needs the VAE"):
        evaluate(trainer, dataset, cfg)
    report = evaluate(trainer, dataset, cfg, vae=vae)
    assert report.tags == {"samples_finite": "True", "bpd.skipped": LIKELIHOOD_NOTE}
    side = 4 * (4 * 9 + 1)  # 16 images of 8x8 (codes are 4x4)
    assert report.images[SAMPLES_IMAGE].size == (side, side)


def test_progress_is_told_each_phase_and_every_sampler_step_and_changes_nothing(moons):
    """``evaluate(progress=)``: sample (every one of the 10 ancestral steps), FID, bits/dim, in that order; the report
    is the one without it, number for number and pixel for pixel (no random number drawn, nothing reordered)."""
    cfg, trainer, dataset = moons
    told = []
    with_progress = evaluate(trainer, dataset, cfg, progress=lambda *event: told.append(event))
    without = evaluate(trainer, dataset, cfg)
    assert measured(with_progress) == measured(without) and with_progress.tags == without.tags
    assert list(with_progress.images[SAMPLES_IMAGE].getdata()) == list(without.images[SAMPLES_IMAGE].getdata())
    phases = [phase for phase, _, _ in told]
    assert list(dict.fromkeys(phases)) == ["sample", "fid", "bpd"]
    sampling = [(done, total) for phase, done, total in told if phase == "sample"]
    assert sampling == [(0, 1)] + [(k, 10) for k in range(1, 11)]


def test_fid_during_training_is_the_fid_of_the_fast_samplers_samples_and_leaves_training_as_it_was(tmp_path):
    """eval.every: measured at every multiple of it, equal to compute_fid on the samples the fast sampler draws from
    the EMA model then (a second way), and training with it takes exactly the steps it takes without (dropout draws
    from the global random state, which the measurement must not move)."""
    import dataclasses

    from diffusion.evaluation import fid_during_training, preserved_random_state
    from diffusion.metrics import compute_fid
    from diffusion.validation import during_training_config

    cfg = digits_config(str(tmp_path), dropout=0.2)  # the U-Net's dropout draws from the global random state
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=6, log_every=2),
                              eval=dataclasses.replace(cfg.eval, every=2, every_n=48, every_steps=5, kid=True))
    dataset = load_dataset(cfg.data)
    plain = build_trainer(cfg, dataset, CPU)
    plain_losses = [r.loss for r in plain.train()]
    measuring = build_trainer(cfg, dataset, CPU)
    curve = {}

    def on_eval(step):
        curve[step] = fid_during_training(measuring, dataset, cfg)
        quick = during_training_config(cfg)
        assert quick.sample.sampler == "ddim" and quick.sample.steps == 5 and quick.sample.n == 48
        with preserved_random_state():  # this second way must not move training's random state either
            measuring.cfg = quick
            again = measuring.sample(48, seed=cfg.seed + 2)[0]  # the same draw, then FID computed directly
            measuring.cfg = cfg
            direct = compute_fid(again, dataset, extractor="classifier", classifier_steps=20, n=48, kid=True,
                                 stderr=False, fid_inf=False, cache_dir=cfg.eval.cache_dir)
        assert curve[step]["fid"] == pytest.approx(direct.fid, rel=1e-6)
        assert curve[step]["kid"] == pytest.approx(direct.kid, rel=1e-6, abs=1e-9)

    measuring.cfg = cfg
    losses = [r.loss for r in measuring.train(on_eval=on_eval)]
    assert sorted(curve) == [2, 4, 6]
    assert all(0 < c["fid"] < float("inf") and c["every_seconds"] > 0 for c in curve.values())
    assert losses == plain_losses
    for a, b in zip(plain.network.state_dict().values(), measuring.network.state_dict().values()):
        assert torch.equal(a, b)


def test_fid_during_training_options_are_checked_under_their_own_names():
    import dataclasses

    from diffusion.errors import ConfigError
    from diffusion.validation import validate

    cfg = moons_config("/nonexistent")
    every = lambda **kw: dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, every=10, **kw))  # noqa: E731
    validate(every())
    with pytest.raises(ConfigError, match=r"^eval\.every_sampler: invalid value 'nope'"):
        validate(every(every_sampler="nope"))
    with pytest.raises(ConfigError, match=r"^eval\.every_steps: invalid value 0"):
        validate(every(every_steps=0))
    with pytest.raises(ConfigError, match=r"^eval\.every: invalid value 10; accepted: 0 while eval\.fid is false"):
        validate(every(fid=False))
    with pytest.raises(ConfigError, match=r"^eval\.every: invalid value -1"):
        validate(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, every=-1)))
    cold = TrialConfig(process=ProcessConfig(name="cold", degradation="blur", T=10),
                       sample=SampleConfig(sampler="cold_improved"), eval=EvalConfig(every=10))
    with pytest.raises(ConfigError, match=r"^eval\.every_sampler: invalid value 'ddim'"):
        validate(cold)  # the Gaussian default: a cold model names one of its own samplers
    validate(dataclasses.replace(cold, eval=EvalConfig(every=10, every_sampler="cold_improved")))
