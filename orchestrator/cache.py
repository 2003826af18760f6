"""The model cache: trained models kept by their training key, so that no training runs twice.

One directory per key (``diffusion.config.training_key``) under ``<storage>/models``:

    spec.json            what was trained (``training_spec``), written when training starts
    run.json             the MLflow training run (id, experiment), written when it is created
    checkpoint.pt        the last resumable checkpoint (every ``train.checkpoint_every`` steps)
    ema.pt               the trained EMA weights (``Trainer.save_ema``)
    model.json           written last: the entry is complete (training run, steps, final loss, seconds)
    likelihood-<h>.json  bits/dim of the model under one set of likelihood settings (``eval`` section)

Every file is written to a temporary name and renamed, so a reader on another node of a shared file
system sees a whole file or none; an entry counts as present only once ``model.json`` exists.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from typing import Iterator, Optional

from diffusion.config import TrialConfig
from diffusion.storage import write_json_atomic

MODEL_FILE = "model.json"
# The eval options the held-out likelihood depends on (with the training key and the sampling batch size).
LIKELIHOOD_OPTIONS = ("bpd_n", "ode_rtol", "ode_atol", "ode_max_nfe", "divergence", "hutchinson_probes", "probe",
                      "dequant_draws")


def read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None


def likelihood_key(cfg: TrialConfig) -> str:
    """Identity of a held-out likelihood evaluation of a trained model: its options and the batch size."""
    options = {name: getattr(cfg.eval, name) for name in LIKELIHOOD_OPTIONS}
    options["batch_size"] = cfg.sample.batch_size
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]


class ModelCache:
    """Trained models by training key under ``root`` (a local or shared-file-system directory)."""

    def __init__(self, root: str):
        self.root = os.path.abspath(os.path.expanduser(root))

    def entry(self, key: str) -> str:
        return os.path.join(self.root, key)

    def path(self, key: str, name: str) -> str:
        return os.path.join(self.entry(key), name)

    def model(self, key: str) -> Optional[dict]:
        """The complete entry's record (``model.json``), or None while the model is missing or unfinished."""
        record = read_json(self.path(key, MODEL_FILE))
        if record is not None and not os.path.exists(self.path(key, "ema.pt")):
            return None
        return record

    def has(self, key: str) -> bool:
        return self.model(key) is not None

    def training_run(self, key: str) -> Optional[dict]:
        """The MLflow training run recorded for this key (``run.json``), finished or not."""
        return read_json(self.path(key, "run.json"))

    def write(self, key: str, name: str, data: dict) -> None:
        write_json_atomic(data, self.path(key, name))

    def invalidate(self, key: str) -> None:
        """Forget a model (``--no-cache``) and what was measured on it; the record goes first, so no reader
        takes half-replaced weights."""
        if not os.path.isdir(self.entry(key)):
            return
        stale = [n for n in os.listdir(self.entry(key)) if n.startswith("likelihood-") and n.endswith(".json")]
        for name in (MODEL_FILE, "run.json", "checkpoint.pt", *stale):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path(key, name))

    @contextlib.contextmanager
    def lock(self, key: str, name: str) -> Iterator[None]:
        """An exclusive lock (flock) on ``<entry>/<name>.lock``: concurrent evaluators of one model take
        turns, so the second finds what the first computed."""
        os.makedirs(self.entry(key), exist_ok=True)
        with open(self.path(key, f"{name}.lock"), "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
