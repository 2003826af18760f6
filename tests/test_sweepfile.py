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


def test_grid_override_adds_one_axis_and_keeps_the_others():
    demo = os.path.join(ROOT, "sweeps", "ddpm_vs_ncsn.yaml")
    sweep = load_sweep(demo, ["grid.sample.steps=[5, 10]"])
    assert sweep.varying == ["variant", "seed", "sample.steps"] and len(sweep.trials) == 8
    assert sorted({t.config.sample.steps for t in sweep.trials}) == [5, 10]
    assert load_sweep(demo, ["grid.seed=[3]"]).varying == ["variant"]  # an existing axis is replaced
    with pytest.raises(ConfigError) as error:  # and the axis is checked like one written in the file
        load_sweep(demo, ["grid.sample.steps=[]"])
    assert error.value.key == "grid.sample.steps"


def test_help_and_version_answer_without_torch_ray_or_mlflow():
    """--help, a command's --help and --version import none of torch, Ray or MLflow (what makes them slow to
    start): checked in a fresh interpreter. --version is the installed distribution's."""
    from importlib.metadata import version

    code = ("import sys\nfrom orchestrator.cli import main\nfor argv in (['--help'], ['sweep', '--help'], "
            "['--version']):\n    try:\n        main(argv)\n    except SystemExit as stop:\n        assert stop.code == 0\n"
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("[]"), result.stdout
    assert f"orchestrator {version('diffusion-orchestrator')}\n" in result.stdout and "usage: orchestrator" in result.stdout


def test_options_filters_by_prefix(capsys):
    assert main(["options", "sample.ste"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("`")[1] for line in lines[2:]] == ["sample.steps", "sample.steps_per_level", "sample.step_size"]
    assert option_table("eval.") == "\n".join(
        line for line in option_table().splitlines() if not line.startswith("| `") or line.startswith("| `eval."))
    assert main(["options", "evl."]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no option key starts with 'evl.'" in error and "eval." in error


def test_zoo_smoke_covers_every_accepted_value():
    """Every value of every model axis the registries accept appears in at least one trial of zoo_smoke."""
    from diffusion import elbo, losses, parameterizations, process_families, samplers, schedules, score_matching

    trials = [t.config for t in load_sweep(os.path.join(ROOT, "sweeps", "zoo_smoke.yaml")).trials]
    schedule_names = set(schedules.VP_SCHEDULES.names()) | set(schedules.VE_SCHEDULES.names()) | {"learned"}
    axes = {
        # blur diffusion (per-frequency, images only) is covered by beyond_smoke.yaml with the non-Gaussian models
        "process.name": (lambda c: c.process.name, set(process_families.PROCESS_FAMILIES) - {"blur"}),
        "process.T": (lambda c: "continuous" if c.process.T == "continuous" else "integer", {"continuous", "integer"}),
        "process.schedule": (lambda c: c.process.schedule, schedule_names),
        "model.parameterization": (lambda c: c.model.parameterization, set(parameterizations.PARAMETERIZATIONS.names())),
        "model.variance": (lambda c: c.model.variance, set(elbo.REVERSE_VARIANCES)),
        "loss.weighting": (lambda c: c.loss.weighting, set(losses.WEIGHTINGS.names())),
        "loss.t_sampling": (lambda c: c.loss.t_sampling, set(losses.T_SAMPLINGS.names())),
        "loss.objective": (lambda c: c.loss.objective, {"denoising"} | set(score_matching.OBJECTIVES.names())),
        "sample.sampler": (lambda c: c.sample.sampler, set(samplers.SAMPLERS.names())),
        "sample.spacing": (lambda c: c.sample.spacing, set(samplers.SPACINGS.names())),
    }
    for key, (read, accepted) in axes.items():
        assert {read(c) for c in trials} == accepted, key


# Issue 14: every bad input is one line and exit status 2, found before anything starts, naming the right key.

SECRET = "do-not-print-this-secret-0123456789"
DEEP = "name: x\nbase: " + "{a: " * 300 + "1" + "}" * 300 + "\n"


def _validate(tmp_path, monkeypatch, capsys, text, overrides=()):
    """`orchestrator validate` in this process on a sweep file of ``text``: (exit status, stderr)."""
    monkeypatch.chdir(tmp_path)
    status = main(["validate", write(tmp_path, text), *overrides])
    captured = capsys.readouterr()
    return status, captured.err


@pytest.mark.parametrize(
    "text,overrides,key,fragment",
    [
        # resolvers and interpolation: refused unresolved, in the file, nested in a string, in variants and grid
        ("name: x\nbase: {data: {root: '${oc.env:SWEEP_SECRET}'}}\n", [], "base.data.root", "'${oc.env:SWEEP_SECRET}'"),
        ("name: x\nbase: {data: {name: '${oc.env:SWEEP_SECRET}'}}\n", [], "base.data.name", "oc.env"),
        ("name: x\nbase: {data: {root: 'a/${oc.decode:${oc.env:SWEEP_SECRET}}/b'}}\n", [], "base.data.root", "oc.decode"),
        ("name: x\nbase: {data: {root: '${foo}'}}\n", [], "base.data.root", "interpolate another key"),
        ("name: x\nbase: {data: {root: '${oc.env:NO_SUCH_VARIABLE}'}}\n", [], "base.data.root", "resolver"),
        ("name: x\nvariants: {a: {data: {root: '${oc.env:SWEEP_SECRET}'}}}\n", [], "variants.a.data.root", "resolver"),
        ("name: x\ngrid: {data.root: [ok, '${oc.env:SWEEP_SECRET}']}\n", [], "grid.data.root[1]", "resolver"),
        ("name: x\nstorage: '${oc.env:SWEEP_SECRET}'\n", [], "storage", "resolver"),
        ("name: x\n", ["base.data.root=${oc.env:SWEEP_SECRET}"], "base.data.root", "resolver"),
        ("name: x\n", ["grid.seed=['${oc.env:SWEEP_SECRET}']"], "grid.seed[0]", "resolver"),
        # tracebacks on HEAD
        ("name: x\n", ["base.train.steps=["], "base.train.steps", "a YAML value"),
        ("name: x\nbase: {resources: {custom: {foo: {bar: 1}}}}\n", [], "base.resources.custom.foo", "a number"),
        ("name: x\nbase: {resources: {custom: [1]}}\n", [], "base.resources.custom", "a mapping"),
        (DEEP, [], "FILE", "nested at most 32 levels"),
        ("name: x\nbase: {seed: " + "9" * 5000 + "}\n", [], "FILE", "4300 digits"),
        # accepted on HEAD
        ("name: x\nbase: {train: {lr: .inf}}\n", [], "base.train.lr", "a finite number"),
        ("name: x\nbase: {loss: {min_snr_gamma: .inf}}\n", [], "base.loss.min_snr_gamma", "a finite number"),
        ("name: x\nbase: {train: {lr: 'nan'}}\n", [], "base.train.lr", "a finite number"),
        ("name: x\ngrid: {train.lr: [0.1, -.inf]}\n", [], "grid.train.lr[1]", "a finite number"),
        ("name: x\n", ["base.sample.eta=.nan"], "base.sample.eta", "a finite number"),
        ("name: x\nbase: {process: {T: 10000000000}}\n", [], "base.process.T", "<= 100_000"),
        ("name: x\nbase: {sample: {n: 1000000000000}}\n", [], "base.sample.n", "<= 1_000_000"),
        ("name: x\nbase: {train: {batch_size: 1000000}}\n", [], "base.train.batch_size", "<= 65_536"),
        ("name: x\nmax_concurrent: true\n", [], "max_concurrent", "an integer >= 1"),
        ("name: x\nbase: {seed: -1}\n", [], "base.seed", ">= 0 and <= 2**63 - 1"),
        ("name: x\nbase: {seed: 9223372036854775808}\n", [], "base.seed", "<= 2**63 - 1"),
        ("name: x\ngrid: {seed: [0, 9223372036854775808]}\n", [], "grid.seed", "<= 2**63 - 1"),
        ("name: x\nbase: {data: {split_seed: -5}}\n", [], "base.data.split_seed", ">= 0"),
        ("name: x\nbase: {train: {steps: 5}}\nbase: {train: {steps: 7}}\n", [], "base", "lines 2 and 3"),
        ("name: x\nbase:\n  train: {steps: 5, steps: 7}\n", [], "base.train.steps", "lines 3 and 3"),
        ("name: x\nvariants:\n  a: {train: {steps: 5}}\n  a: {train: {steps: 7}}\n", [], "variants.a",
         "each variant name once"),
        # the right key
        ("name: x\nbase: {data: [1, 2]}\n", [], "base.data", "a mapping of keys name, root"),
        ("name: x\nvariants: {a: {train: 3}}\n", [], "variants.a.train", "a mapping of keys steps"),
        ("name: x\n", ["=5"], "override", "non-empty key"),
        ("name: x\n", ["base..steps=5"], "override", "non-empty key"),
        ("name: x\nbase: {process: {beta_end: .nan}}\n", [], "base.process.beta_end", "a finite number"),
        ("name: x\nbase: {process: {beta_end: 2}}\n", [], "base.process.beta_end", "(0, 1)"),
        ("name: x\nbase: {process: {name: ve, schedule: geometric, sigma_max: -1}}\n", [], "base.process.sigma_max",
         "positive"),
        ("name: x\ngrid: {sample.eta: [0.5, 2]}\n", [], "grid.sample.eta", "[0, 1]"),
        ("name: x\ngrid: {train.steps: [many]}\n", [], "grid.train.steps", "int"),
        ("name: x\nbase: {sample: {eta: 2}}\nvariants: {a: {}, b: {}}\n", [], "base.sample.eta", "[0, 1]"),
        ("name: x\nbase: {sample: {eta: 0.5}}\nvariants: {a: {sample: {eta: 3}}}\n", [], "variants.a.sample.eta",
         "[0, 1]"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, text, overrides, key, fragment):
    monkeypatch.setenv("SWEEP_SECRET", SECRET)
    status, err = _validate(tmp_path, monkeypatch, capsys, text, overrides)
    assert status == 2, err
    assert err.startswith(f"orchestrator: error: {key}: invalid value ") and err.count("\n") == 1, err
    assert fragment in err, err
    assert SECRET not in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["sweep.yaml"]  # nothing written


def test_values_at_the_bounds_are_accepted(tmp_path):
    text = ("name: x\nbase: {process: {T: 100000}, sample: {n: 1000000, batch_size: 65536}, seed: 9223372036854775807,"
            " data: {split_seed: 0}}\n")
    config = load_sweep(write(tmp_path, text)).trials[0].config
    assert (config.process.T, config.sample.n, config.seed) == (100_000, 1_000_000, 2**63 - 1)


def test_overrides_merge_without_touching_aliases_and_keep_dotlist_numbers(tmp_path):
    text = "name: x\nbase: &b {train: {steps: 5}}\nvariants: {a: *b, b: {train: {steps: 6}}}\n"
    sweep = load_sweep(write(tmp_path, text), ["base.train.steps=9", "grid={train.lr: [1e-3]}"])
    assert [(t.name, t.config.train.steps) for t in sweep.trials] == [("a-train.lr=0.001", 5), ("b-train.lr=0.001", 6)]
    assert sweep.source["base"] == {"train": {"steps": 9}} and sweep.source["variants"]["a"] == {"train": {"steps": 5}}


def test_an_error_message_shows_at_most_80_characters_of_the_value(tmp_path):
    for value in ("x" * 10_000, list(range(10**6)), {str(i): [i] * 100 for i in range(10**4)}, 10**5000):
        assert len(str(ConfigError("k", value, "y"))) <= len("k: invalid value ; accepted: y") + 80
    with pytest.raises(ConfigError) as info:
        load_sweep(write(tmp_path, "name: x\nbase: {sample: {sampler: " + "s" * 500 + "}}\n"))
    shown = str(info.value).split("invalid value ", 1)[1].split("; accepted:")[0]
    assert len(shown) <= 80 and shown.endswith("...")


def test_billion_laughs_is_refused_in_seconds_and_little_memory(tmp_path):
    """Nine levels of nine aliases (387 million values expanded) inside a trial-config key: refused from the small
    node graph, under an address-space limit of 500 MB above what the interpreter holds after its imports."""
    lines = ["name: bomb", "base:", "  model:", "    channel_mult:", "      - &a [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"      - &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    path = write(tmp_path, "\n".join(lines) + "\n")
    script = (
        "import resource, sys, time\n"
        "from orchestrator.sweepfile import load_sweep\n"
        "from diffusion.errors import ConfigError\n"
        "vm = [int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmSize:')][0] * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + 500 * 2**20, vm + 500 * 2**20))\n"
        "start = time.monotonic()\n"
        "try:\n"
        "    load_sweep(sys.argv[1])\n"
        "except ConfigError as error:\n"
        "    print(f'{time.monotonic() - start:.3f}', error)\n"
        "    sys.exit(2)\n")
    result = subprocess.run([sys.executable, "-c", script, path], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=ROOT), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    seconds, message = result.stdout.split(" ", 1)
    assert float(seconds) < 5 and message.startswith("FILE: ") and "at most 100_000 values" in message, result.stdout


def test_option_table_states_the_bounds():
    from diffusion import config
    from orchestrator.options import option_rows

    rows = {key: meaning for key, _, meaning in option_rows()}
    assert set(config.INT_BOUNDS) <= set(rows)
    for key, (low, high) in config.INT_BOUNDS.items():
        assert f"{config.show_bound(low)} to {config.show_bound(high)})" in rows[key], key
    assert rows["process.T"].endswith("(range: 1 to 100_000)")
    assert rows["seed"].endswith("(range: 0 to 2**63 - 1)")
    assert "(range: 1 to 1_000_000)" in option_table()
