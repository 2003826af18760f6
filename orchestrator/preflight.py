"""A sweep's preflight: what would fail later fails here, before MLflow starts or anything is written (tracking
credentials, data sets and what FID needs of them, Ray started or joined with a node for every trial), and Ray
set up safely."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from typing import Callable, Iterator, Optional

from diffusion.errors import ConfigError

from .sweepfile import Sweep, Trial, key_origin
from .tracking import SECRET_ENV, check_tracking_access, check_tracking_uri_credentials


# What Ray, Tune and MLflow would print beside the sweep's own view (``liveview.sweep_display``), turned off; a value
# the user set wins. Set in the driver before Ray starts, so a local instance's workers inherit them; a joined
# cluster's workers get MLflow's through ``tracking.worker_env``.
QUIET_ENV = {
    # Tune's older reporter, silent at verbose=0: no configuration table, results path or TensorBoard hint
    "RAY_AIR_NEW_OUTPUT": "0",
    # no "[repeated Nx across cluster]" notes (read when Ray is imported: ``cli`` sets it before)
    "RAY_DEDUP_LOGS": "0",
    # no "View run ... at http://127.0.0.1:PORT" links to the sweep's tracking server, gone once it ends
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    # no usage reports to MLflow's servers; and its telemetry thread sets and removes a variable of the environment
    # (_MLFLOW_TELEMETRY_SESSION_ID), which fails a request reading the environment at that moment (a KeyError
    # from urllib's proxy lookup: "log-batch failed with exception '_MLFLOW_TELEMETRY_SESSION_ID'")
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


def quiet_env() -> None:
    """``QUIET_ENV`` into the environment (values already set stay), and Ray's worker-log prefixes uncoloured when
    stdout is not a terminal."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


@contextlib.contextmanager
def preflight(sweep: Sweep, workdir: str, resume: bool, address: Optional[str],
              meanwhile: Optional[Callable[[], None]] = None) -> Iterator[bool]:
    """Check the sweep (``--resume`` has something to resume, the tracking URI holds no credentials and its server
    answers and accepts the credentials of the environment, the data
    sets load and FID's extractor, reference and files can serve them, and for a local Ray instance this machine
    has every trial's resources), then start or join Ray (``start_ray``, which checks the resources); yields whether
    the workers are on a joined cluster. Ray is shut down when the body ends, however it ends.

    ``meanwhile()`` (quick: it starts something in the background, e.g. the tracking server) is called once
    everything is checked that can be: before a local Ray instance starts (so that both start at once), after a
    joined cluster's resources are checked."""
    if resume and not os.environ.get("MLFLOW_TRACKING_URI") and not os.path.exists(os.path.join(workdir, "mlflow.db")):
        raise ConfigError("--resume", sweep.name, "a sweep run earlier from this directory (or with this "
                          "MLFLOW_TRACKING_URI)", detail=f"there is no mlflow.db in {workdir}")
    check_tracking_uri_credentials(os.environ.get("MLFLOW_TRACKING_URI"))
    check_tracking_access(os.environ.get("MLFLOW_TRACKING_URI"))
    check_data(sweep)
    joined = address is not None or bool(os.environ.get("RAY_ADDRESS"))
    if not joined:
        check_resources(sweep, local_resources(), "this machine")
        if meanwhile is not None:
            meanwhile()
    import ray

    try:
        remote = start_ray(sweep, address)
        if joined and meanwhile is not None:
            meanwhile()
        yield remote
    finally:
        if ray.is_initialized():
            ray.shutdown()


def start_ray(sweep: Sweep, address: Optional[str]) -> bool:
    """Start a local Ray instance, or join the cluster at ``address``, and check that some node can give every
    trial its resources (ConfigError otherwise, with Ray shut down again). Returns whether the workers are on a
    cluster joined here (they need the driver's credentials handed to them) rather than a local instance
    started here (they inherit the driver's environment)."""
    import ray

    remote = address is not None or bool(os.environ.get("RAY_ADDRESS"))
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C raises KeyboardInterrupt here
    quiet_env()
    # Ray's notice that it turned token authentication on for a local instance (docs/SECURITY.md) is not news
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Ray Train (data-parallel trials) watches its controller through the state API, which the dashboard serves
    # (on 127.0.0.1); other sweeps do without it
    parallel = any(trial.config.resources.workers > 1 for trial in sweep.trials)
    if not remote:  # a local raylet prestarts one idle worker per CPU, which no trial uses (an actor gets a process of
        # its own): on a small machine they take the CPU the launch needs (2 s of 15 to the first step on 2 cores)
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    ray.init(address=address, include_dashboard=parallel, log_to_driver=True, configure_logging=True,
             logging_level="WARNING")
    if not remote:
        private_token_file()
    try:
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        check_resources(sweep, nodes, f"the Ray cluster at {address}" if remote else "this machine")
    except BaseException:
        ray.shutdown()
        raise
    return remote


def private_token_file() -> None:
    """Ray starts a local instance with token authentication (its ports listen on every interface), keeping the
    token in ``~/.ray/auth_token`` (or ``$RAY_AUTH_TOKEN_PATH``), created readable by everyone. Make it readable
    by its owner only, so that other users of the machine cannot join the instance and run code."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser(os.path.join("~", ".ray", "auth_token"))
    try:
        info = os.stat(path)
        if info.st_uid == os.getuid() and info.st_mode & 0o077:
            os.chmod(path, 0o600)
    except OSError:  # no token file (RAY_AUTH_TOKEN given, or authentication off): nothing to protect
        pass


def keep_credentials_out_of_tune() -> None:
    """Ray Tune copies AWS credentials from the driver's environment into the runtime_env of every trial actor
    (``ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE``), and Ray's runtime_env agent logs runtime_envs
    in plain text. Take them off that list: a local instance's workers inherit them anyway, and a joined
    cluster's get them through ``tune.with_parameters`` (``tuning._fit``)."""
    from ray.tune.execution import class_cache

    for name in SECRET_ENV:
        class_cache.ENV_VARS_TO_PROPAGATE.discard(name)


def check_data(sweep: Sweep, fetch: bool = True) -> dict:
    """Load each data set the sweep uses once (ConfigError naming the trial's key when its files are missing), and
    check what FID needs of it (``check_fid``) and that its networks can be built (``check_networks``). Returns each
    data config's ``repr`` -> its loaded data set.

    ``fetch=False`` (``--dry-run``, ``validate``): nothing is downloaded; a torchvision data set that
    ``data.download`` would fetch stands in by its shape (``diffusion.data.not_downloaded``), its FID unchecked."""
    datasets, pending = {}, set()
    for trial in sweep.trials:
        data = trial.config.data
        if repr(data) in datasets:
            continue
        try:
            datasets[repr(data)], waiting = _load_for_checks(data, fetch)
        except ConfigError as error:
            raise ConfigError(_origin(sweep, trial, error.key), error.value, error.accepted,
                              detail=error.detail) from None
        if waiting:
            pending.add(repr(data))
    check_fid(sweep, {key: value for key, value in datasets.items() if key not in pending})
    check_networks(sweep, datasets)
    return datasets


def _load_for_checks(data, fetch: bool):
    """(the data set, whether it stands in for one ``data.download`` would fetch: ``check_data``)."""
    from diffusion.data import TORCHVISION_SETS, load_dataset, not_downloaded

    if fetch or not data.download:
        return load_dataset(data), False
    try:
        return load_dataset(dataclasses.replace(data, download=False)), False
    except ConfigError:
        if data.name not in TORCHVISION_SETS:
            raise
        return not_downloaded(data), True


def network_shape(cfg, dataset) -> tuple[int, ...]:
    """The shape of the examples a trial's diffusion network sees: the data's, or a latent model's codes'."""
    shape = tuple(dataset.shape)
    if cfg.model.latent:
        shape = (cfg.model.latent_channels, *(side // cfg.model.latent_factor for side in shape[1:]))
    return shape


def check_networks(sweep: Sweep, datasets: dict) -> None:
    """Build each distinct network of the sweep on the ``meta`` device (shapes only, no memory): a network its data
    cannot have (``model.attention_resolutions`` that are no side of its feature maps, say) is a ConfigError naming
    the trial's key, here rather than in every trial."""
    import torch

    from diffusion.nets import build_network

    seen = set()
    for trial in sweep.trials:
        cfg = trial.config
        dataset = datasets[repr(cfg.data)]
        key = (repr(cfg.model), repr(cfg.data))
        if key in seen:
            continue
        seen.add(key)
        try:
            with torch.device("meta"):
                build_network(cfg.model, network_shape(cfg, dataset),
                              dataset.num_classes if cfg.model.class_conditional else None)
        except ConfigError as error:
            raise ConfigError(_origin(sweep, trial, error.key), error.value, error.accepted,
                              detail=error.detail) from None


def check_fid(sweep: Sweep, datasets: dict) -> None:
    """What each trial's FID needs of its data set (``diffusion.evaluation.check_fid``: an extractor and a reference
    that can serve it, clean-fid's Inception weights and published statistics on disk unless ``eval.download``),
    as a ConfigError naming the trial's key: a missing file stops the sweep here, before Ray or MLflow start, not
    in every trial. ``datasets``: each data config's ``repr`` -> its loaded data set."""
    from diffusion.evaluation import check_fid as check_trial_fid

    seen = set()
    for trial in sweep.trials:
        cfg = trial.config
        key = (repr(cfg.data), cfg.eval.extractor, cfg.eval.reference, cfg.eval.cache_dir, cfg.eval.download)
        if not cfg.eval.fid or key in seen or repr(cfg.data) not in datasets:
            continue
        seen.add(key)
        try:
            check_trial_fid(datasets[repr(cfg.data)], cfg)
        except ConfigError as error:
            raise ConfigError(_origin(sweep, trial, error.key), error.value, error.accepted,
                              detail=error.detail) from None


def local_resources() -> list[dict]:
    """This machine as one Ray node would see it: its CPUs and GPUs."""
    import torch

    return [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]


RESOURCE_KEYS = {"CPU": "cpu", "GPU": "gpu"}


def check_resources(sweep: Sweep, nodes: list[dict], where: str) -> None:
    """ConfigError for the first trial whose resources no single node of ``nodes`` (Ray's resource dicts) has:
    Ray would keep it pending forever."""
    for trial in sweep.trials:
        res = trial.config.resources
        wanted = {"CPU": res.cpu, "GPU": res.gpu, **{name: float(amount) for name, amount in res.custom.items()}}
        wanted = {name: amount for name, amount in wanted.items() if amount > 0}
        if any(all(node.get(name, 0.0) >= amount for name, amount in wanted.items()) for node in nodes):
            _check_workers(sweep, trial, wanted, nodes, where)
            continue
        for name, amount in wanted.items():
            most = max((node.get(name, 0.0) for node in nodes), default=0.0)
            key = f"resources.{RESOURCE_KEYS[name]}" if name in RESOURCE_KEYS else f"resources.custom.{name}"
            if amount > most:
                have = f"at most {most:g} (the most any node of {where} has)" if most else f"nothing: no node of {where} has {name}"
                raise ConfigError(_origin(sweep, trial, key), amount, have,
                                  detail=f"trial {trial.name} would wait for ever")
        raise ConfigError(_origin(sweep, trial, "resources"), dict(wanted), f"resources one node of {where} has",
                          detail=f"no single node has all of them; trial {trial.name} would wait for ever")


def _check_workers(sweep: Sweep, trial: Trial, wanted: dict, nodes: list[dict], where: str) -> None:
    """A data-parallel trial's workers (each with ``wanted``) must fit on the nodes together, each on one node."""
    workers = trial.config.resources.workers
    fits = sum(min((int(node.get(name, 0.0) // amount) for name, amount in wanted.items()), default=workers)
               for node in nodes)
    if fits < workers:
        raise ConfigError(_origin(sweep, trial, "resources.workers"), workers,
                          f"at most {fits} (the workers of {dict(wanted)} each that {where} holds at once)",
                          detail=f"trial {trial.name} would wait for ever")


def _origin(sweep: Sweep, trial: Trial, key: str) -> str:
    """The sweep-file path of a trial's config key (grid.<key>, variants.<name>.<key> or base.<key>)."""
    variants = sweep.source.get("variants") or {}
    return key_origin(key, sweep.source.get("base") or {}, trial.variant if variants else None,
                      variants.get(trial.variant) or {}, trial.axes)
