"""Sweep files: expansion into trials, validation errors, the CLI's exit status, the option table."""
import os
import subprocess
import sys

import pytest

from diffusion.errors import ConfigError
from orchestrator.cli import main
from orchestrator.options import option_table
from orchestrator.sweepfile import flatten, load_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text, name="sweep.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_demo_sweep_expands_to_variants_times_grid():
    sweep = load_sweep(os.path.join(ROOT, "sweeps", "ddpm_vs_ncsn.yaml"))
    assert [t.name for t in sweep.trials] == ["ddpm-seed=0", "ddpm-seed=1", "ncsn-seed=0", "ncsn-seed=1"]
    assert sweep.varying == ["variant", "seed"]
    ddpm, ncsn = sweep.trials[0].config, sweep.trials[3].config
    assert (ddpm.process.name, ddpm.process.schedule, ddpm.process.T) == ("vp", "linear", 1000)
    assert (ddpm.model.parameterization, ddpm.loss.weighting, ddpm.sample.sampler) == ("eps", "simple", "ancestral")
    assert (ncsn.process.name, ncsn.process.schedule) == ("ve", "geometric")
    assert (ncsn.model.parameterization, ncsn.loss.weighting, ncsn.sample.sampler) == (
        "score", "sigma2", "annealed_langevin")
    assert ncsn.seed == 1 and ddpm.data.name == "digits"


def test_grid_product_and_cli_overrides(tmp_path):
    path = write(tmp_path, "name: g\nbase: {train: {steps: 5}}\ngrid: {seed: [0, 1, 2], process.T: [10, 20]}\n")
    sweep = load_sweep(path, ["base.train.steps=7", "grid.seed=[4]"])
    assert len(sweep.trials) == 2
    assert {t.config.process.T for t in sweep.trials} == {10, 20}
    assert all(t.config.train.steps == 7 and t.config.seed == 4 for t in sweep.trials)
    assert sweep.trials[0].name == "base-seed=4,process.T=10"
    assert sweep.varying == ["process.T"]


@pytest.mark.parametrize(
    "text,key,accepted",
    [
        ("name: x\nbase: {train: {stepz: 1}}\n", "base.train.stepz", "steps"),
        ("name: x\nbase: {train: {steps: many}}\n", "base.train.steps", "int"),
        ("name: x\nvariants: {a: {sample: {sampler: foo}}}\n", "variants.a.sample.sampler", "annealed_langevin"),
        ("name: x\nbase: {process: {T: 0}}\n", "base.process.T", ">= 1"),
        ("name: x\ngrid: {seed: []}\n", "grid.seed", "non-empty list"),
        ("name: x\ngrid: {sample.foo: [1]}\n", "grid.sample.foo", "sampler"),
        ("name: x\nbase: {process: {name: ve, schedule: linear}}\n", "base.process.schedule", "geometric"),
        ("base: {}\n", "name", "name"),
        ("name: x\nextra: 1\n", "extra", "top-level keys"),
        ("name: x\nbase: {process: {T: 3\n", "FILE", "YAML"),
        ("name: x\nbase: {loss: {objective: sliced}}\n", "base.loss.weighting", "sigma2"),
        ("name: x\nbase: {process: {schedule: learned}}\n", "base.loss.weighting", "elbo"),
        ("name: x\nbase: {process: {name: ve, schedule: learned}}\n", "base.process.schedule", "variance preserving"),
        ("name: x\nbase: {process: {T: continuous}, model: {parameterization: mean}}\n",
         "base.model.parameterization", "needs an integer process.T"),
        ("name: x\nbase: {process: {T: continuous}, model: {variance: learned_range}}\n",
         "base.model.variance", "one discrete step"),
        ("name: x\nbase: {model: {variance: learnt}}\n", "base.model.variance", "learned_range"),
        ("name: x\nbase: {loss: {objective: implicit, weighting: sigma2}}\n", "base.data.name", "2-D set"),
        ("name: x\nbase: {data: {name: moons}, loss: {objective: implicit, weighting: sigma2},"
         " model: {variance: learned_range}}\n", "base.model.variance", "no variational bound"),
        ("name: x\nbase: {loss: {t_sampling: often}}\n", "base.loss.t_sampling", "importance"),
        ("name: x\nbase: {loss: {objective: exact}}\n", "base.loss.objective", "implicit, sliced"),
        ("name: x\nbase: {process: {T: often}}\n", "base.process.T", "continuous"),
        ("name: x\nbase: {process: {name: subvp, T: 100}}\n", "base.process.T", "continuous"),
        ("name: x\nbase: {sample: {sampler: ddim, eta: 2}}\n", "base.sample.eta", "[0, 1]"),
        ("name: x\nbase: {process: {T: continuous}, sample: {spacing: leading}}\n", "base.sample.spacing", "karras"),
    ],
)
def test_bad_input_names_key_value_and_accepted(tmp_path, text, key, accepted):
    with pytest.raises(ConfigError) as info:
        load_sweep(write(tmp_path, text))
    message = str(info.value)
    assert message.startswith(key + ":"), message
    assert accepted in message


def test_cli_exit_status_2_without_traceback(tmp_path):
    path = write(tmp_path, "name: x\nbase: {sample: {sampler: foo}}\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    for args in (["validate", path], ["sweep", "--dry-run", path], ["sweep", str(tmp_path / "missing.yaml")]):
        result = subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                                env=env, cwd=tmp_path)
        assert result.returncode == 2, args
        assert "Traceback" not in result.stderr and result.stderr.startswith("orchestrator: error: ")
    assert sorted(os.listdir(tmp_path)) == ["sweep.yaml"]


def test_dry_run_lists_trials(capsys):
    assert main(["sweep", "--dry-run", os.path.join(ROOT, "sweeps", "ddpm_vs_ncsn.yaml")]) == 0
    out = capsys.readouterr().out
    assert "4 trial(s)" in out and "ncsn-seed=1" in out and "annealed_langevin" in out


def test_flatten_gives_dotted_params():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}


def test_readme_option_table_is_current():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    table = option_table()
    assert table in readme, "README.md's option table is stale: regenerate it with `orchestrator options`"
    assert table.count("\n") > 40 and "| `sample.sampler` | `ancestral` |" in table


def test_zoo_smoke_covers_every_accepted_value():
    """Every value of every model axis the registries accept appears in at least one trial of zoo_smoke."""
    from diffusion import elbo, losses, parameterizations, processes, samplers, score_matching

    trials = [t.config for t in load_sweep(os.path.join(ROOT, "sweeps", "zoo_smoke.yaml")).trials]
    schedules = set(processes.VP_SCHEDULES.names()) | set(processes.VE_SCHEDULES.names()) | {"learned"}
    axes = {
        # blur diffusion (per-frequency, images only) is covered by beyond_smoke.yaml with the non-Gaussian models
        "process.name": (lambda c: c.process.name, set(processes.PROCESS_FAMILIES) - {"blur"}),
        "process.T": (lambda c: "continuous" if c.process.T == "continuous" else "integer", {"continuous", "integer"}),
        "process.schedule": (lambda c: c.process.schedule, schedules),
        "model.parameterization": (lambda c: c.model.parameterization, set(parameterizations.PARAMETERIZATIONS.names())),
        "model.variance": (lambda c: c.model.variance, set(elbo.VARIANCES)),
        "loss.weighting": (lambda c: c.loss.weighting, set(losses.WEIGHTINGS.names())),
        "loss.t_sampling": (lambda c: c.loss.t_sampling, {"uniform", "importance"}),
        "loss.objective": (lambda c: c.loss.objective, {"denoising"} | set(score_matching.OBJECTIVES.names())),
        "sample.sampler": (lambda c: c.sample.sampler, set(samplers.SAMPLERS.names())),
        "sample.spacing": (lambda c: c.sample.spacing, set(samplers.SPACINGS.names())),
    }
    for key, (read, accepted) in axes.items():
        assert {read(c) for c in trials} == accepted, key
