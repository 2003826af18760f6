"""A sweep file's search section (orchestrator.search): its validation, its draws and how it composes with
variants and the grid. No Ray here: the trials a search makes are ordinary trials."""
import math
import os
import statistics

import pytest
import yaml

from diffusion.errors import ConfigError
from orchestrator.search import Search
from orchestrator.sweepfile import load_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPACE = {"train.lr": {"loguniform": [1.0e-5, 3.0e-3]}, "train.ema_decay": {"choice": [0.99, 0.999, 0.9999]},
         "process.schedule": {"choice": ["linear", "cosine"]}, "model.channels": {"qrandint": [16, 64, 16]}}


def write(tmp_path, **search) -> str:
    sweep = {"name": "s", "base": {"data": {"name": "digits"}, "train": {"steps": 10}},
             "variants": {"a": {}, "b": {"train": {"batch_size": 32}}}, "grid": {"seed": [0, 1]},
             "search": {"algorithm": "random", "num_samples": 3, "space": SPACE, **search}}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return str(path)


def test_search_composes_with_variants_and_grid_and_is_the_same_every_time(tmp_path):
    sweep = load_sweep(write(tmp_path))
    assert len(sweep.trials) == 2 * 2 * 3  # variants x grid x num_samples
    assert sweep.trials[0].name == "a-seed=0,sample=0" and sweep.trials[-1].name == "b-seed=1,sample=2"
    for trial in sweep.trials:
        cfg = trial.config
        assert 1e-5 <= cfg.train.lr <= 3e-3 and cfg.train.ema_decay in (0.99, 0.999, 0.9999)
        assert cfg.process.schedule in ("linear", "cosine") and cfg.model.channels in (16, 32, 48, 64)
        assert trial.axes["train.lr"] == cfg.train.lr  # the drawn values are the trial's axes (reports, names)
    # every variant and grid point gets the same draws: a fair comparison of them
    draws = {t.name.split(",")[1]: t.config.train.lr for t in sweep.trials if t.name.startswith("a-seed=0")}
    assert all(t.config.train.lr == draws[t.name.split(",")[1]] for t in sweep.trials)
    assert [t.config for t in load_sweep(write(tmp_path)).trials] == [t.config for t in sweep.trials]
    other = load_sweep(write(tmp_path, seed=1))
    assert [t.config.train.lr for t in other.trials] != [t.config.train.lr for t in sweep.trials]
    assert "train.lr" in sweep.varying and sweep.search.num_samples == 3


def test_draws_follow_their_distributions():
    """Against closed forms: a log-uniform's median is the geometric mean of its bounds; qrandint's multiples of q are
    equally likely, both ends included; randint excludes its upper bound; quniform gives multiples of q."""
    space = {"a": ("loguniform", [1e-4, 1e-2]), "b": ("qrandint", [16, 64, 16]), "c": ("randint", [0, 3]),
             "d": ("quniform", [0.0, 1.0, 0.25]), "e": ("uniform", [2.0, 4.0])}
    draws = Search(num_samples=4000, seed=3, space=space).draws()
    below = sum(d["a"] < math.sqrt(1e-4 * 1e-2) for d in draws) / len(draws)
    assert abs(below - 0.5) < 4 * math.sqrt(0.25 / len(draws))
    for key, values in (("b", [16, 32, 48, 64]), ("c", [0, 1, 2]), ("d", [0.0, 0.25, 0.5, 0.75, 1.0])):
        counts = [sum(d[key] == v for d in draws) for v in values]
        assert sum(counts) == len(draws), key
        share = len(draws) / len(values) if key != "d" else None
        if share:
            assert all(abs(c - share) < 5 * math.sqrt(share) for c in counts), (key, counts)
    assert abs(statistics.mean(d["e"] for d in draws) - 3.0) < 4 * (2 / math.sqrt(12)) / math.sqrt(len(draws))


@pytest.mark.parametrize("override, key, fragment", [
    ("search.space.train.lr={loguniform: [0, 1]}", "search.space.train.lr.loguniform", "0 < low"),
    ("search.space.train.lrr={uniform: [0, 1]}", "search.space.train.lrr", "unknown key train.lrr"),
    ("search.space.process.schedule={choice: [linear, nope]}", "search.space.process.schedule", "one of cosine"),
    ("search.space.train.steps={randint: [5, 5]}", "search.space.train.steps.randint", "low < high"),
    ("search.space.train.steps={qrandint: [5, 9, 10]}", "search.space.train.steps.qrandint", "a multiple of q"),
    ("search.space.train.warmup={uniform: [9, 1]}", "search.space.train.warmup.uniform", "low <= high"),
    ("search.space.train.batch_size={choice: [16, x]}", "search.space.train.batch_size", "of type int"),
    ("search.space.train.grad_clip={normal: [0, 1]}", "search.space.train.grad_clip", "unknown distribution normal"),
    ("search.num_samples=0", "search.num_samples", "an integer from 1"),
    ("search.mode=best", "search.mode", "min or max"),
    ("search.algorithm=grid", "search.algorithm", "random, optuna, hyperopt"),
    ("search.space.seed={choice: [3]}", "search.space.seed", "grid.seed sets it too"),
])
def test_bad_search_sections_are_refused_naming_the_key(tmp_path, override, key, fragment):
    with pytest.raises(ConfigError) as error:
        load_sweep(write(tmp_path), [override])
    assert error.value.key == key and fragment in str(error.value), str(error.value)


def test_every_value_a_distribution_can_give_is_checked_not_only_those_drawn(tmp_path):
    """One draw cannot show a bad choice, or a range's end out of bounds: they are refused all the same."""
    with pytest.raises(ConfigError, match=r"^search\.space\.sample\.sampler: invalid value 'nope'"):
        load_sweep(write(tmp_path, num_samples=1, space={"sample.sampler": {"choice": ["ddim"] + ["nope"]}}))
    with pytest.raises(ConfigError, match=r"^search\.space\.train\.ema_decay"):  # the upper end is out of range
        load_sweep(write(tmp_path, num_samples=1, space={"train.ema_decay": {"uniform": [0.9, 1.5]}}))


def test_a_missing_optional_searcher_is_refused_with_the_extra_to_install(tmp_path):
    import importlib.util

    for name in ("optuna", "hyperopt"):
        with pytest.raises(ConfigError) as error:
            load_sweep(write(tmp_path), [f"search.algorithm={name}"])
        assert error.value.key == "search.algorithm"
        state = "is missing" if importlib.util.find_spec(name) is None else "is installed"
        assert f"package {name} {state}" in str(error.value) and "not built yet" in str(error.value)
