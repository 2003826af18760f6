"""The model cache: trained models kept by their training key, so that no training runs twice.

One directory per key (``orchestrator.keys.training_key``) under ``<storage>/models``:

    spec.json            what was trained (``training_spec``), written when training starts
    run.json             the MLflow training run (id, experiment), written when it is created
    checkpoint.pt        the last resumable checkpoint (every ``train.checkpoint_every`` steps)
    checkpoint.json      its sha256 and size (a checkpoint that does not match is not resumed)
    ema.pt               the trained EMA weights (``Trainer.save_ema``)
    model.json           written last: the entry is complete (training run, steps, final loss, seconds, and
                         ``files``: the sha256 and size of ema.pt, verified by :meth:`ModelCache.model`)
    likelihood-<h>.json  bits/dim of the model under one set of likelihood settings (``eval`` section)
    <name>.lock          an entry's locks (:meth:`ModelCache.lock`, from ``.locks``): ``train``, ``likelihood-<h>``

``<storage>`` is a directory (local, or a shared file system seen by every node) or an object-store URI
that pyarrow understands (``s3://bucket/prefix``, ``gs://bucket/prefix``). Credentials never go in the
URI: they come from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...), which the sweep
hands to its workers (``orchestrator.tracking.worker_env``) and never records.

In a directory every file is written to a temporary name and renamed; an object store makes an object
visible whole when its upload completes. Either way a reader on another node sees a whole file or none,
and an entry counts as present only once ``model.json`` exists. Binary files of an object-store entry
are written to and read from a local staging copy (:meth:`ModelCache.local`, :meth:`ModelCache.fetch`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Callable, Optional
from urllib.parse import parse_qs, urlsplit

from diffusion.config import TrialConfig
from diffusion.errors import ConfigError
from diffusion.storage import file_digest, write_atomic, write_json_atomic

from .locks import EntryLocks

MODEL_FILE = "model.json"
CHECKPOINT, CHECKPOINT_SUM = "checkpoint.pt", "checkpoint.json"
# The eval options the held-out likelihood depends on (with the training key and the sampling batch size).
LIKELIHOOD_OPTIONS = ("bpd_n", "ode_rtol", "ode_atol", "ode_max_nfe", "divergence", "hutchinson_probes", "probe",
                      "dequant_draws")
# URI query parameters (pyarrow's) and URL parts that would put a secret into the sweep file and its records.
SECRET_QUERY = ("access_key", "secret_key", "session_token", "password", "token")
STAGING_ENV = "ORCHESTRATOR_CACHE_STAGING"  # where object-store entries are staged locally


def read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None


def warn_damaged(key: str, name: str, problem: str, action: str) -> None:
    """The one warning about a damaged cache file (on stderr, which Ray forwards from its workers)."""
    print(f"warning: model cache entry {key}: {name} is damaged ({problem}); {action}", file=sys.stderr, flush=True)


# Checksums verified in this process: (file identity, expected sha256) -> problem or None.
_VERIFIED: dict[tuple, Optional[str]] = {}


def likelihood_key(cfg: TrialConfig) -> str:
    """Identity of a held-out likelihood evaluation of a trained model: its options and the batch size."""
    options = {name: getattr(cfg.eval, name) for name in LIKELIHOOD_OPTIONS}
    options["batch_size"] = cfg.sample.batch_size
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]


def is_uri(location: str) -> bool:
    """An object-store (or other pyarrow file system) URI rather than a directory path."""
    return "://" in location and not location.startswith("file://")


def local_path(location: str) -> str:
    return location[len("file://"):] if location.startswith("file://") else location


def check_uri(key: str, uri: str) -> None:
    """ConfigError when ``uri`` carries a credential (user:password@ or a secret query parameter)."""
    parts = urlsplit(uri)
    query = {name.lower() for name in parse_qs(parts.query)}
    if parts.password is not None or parts.username is not None or query & set(SECRET_QUERY):
        shown = f"{parts.scheme}://{parts.hostname or ''}{parts.path}"
        raise ConfigError(key, shown + "?...", "a URI without credentials, e.g. s3://bucket/prefix",
                          detail="credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                                 "AWS_ENDPOINT_URL, ...), never from the sweep file, which is recorded")


def filesystem(uri: str):
    """(pyarrow file system, path inside it) of a storage URI. An ``s3://`` URI without ``endpoint_override``
    takes its endpoint from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` when set (an S3-compatible store such
    as MinIO; pyarrow does not read these variables itself), and its region from ``AWS_REGION`` /
    ``AWS_DEFAULT_REGION``; the keys come from the environment as usual."""
    from pyarrow import fs as pafs

    parts = urlsplit(uri)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if parts.scheme == "s3" and endpoint and "endpoint_override" not in parse_qs(parts.query):
        where = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        options = {"region": region} if region else {}
        return pafs.S3FileSystem(endpoint_override=where.netloc, scheme=where.scheme, **options), \
            f"{parts.netloc}{parts.path}".rstrip("/")
    return pafs.FileSystem.from_uri(uri)


class ModelCache(EntryLocks):
    """Trained models by training key under ``root``: a directory, or an object-store URI (pyarrow)."""

    def __init__(self, root: str, staging: Optional[str] = None):
        self.remote = is_uri(root)
        if self.remote:
            check_uri("storage", root)
            self.root = root.rstrip("/")
            digest = hashlib.sha256(self.root.encode()).hexdigest()[:12]
            base = staging or os.environ.get(STAGING_ENV) or os.path.join(tempfile.gettempdir(), "orchestrator-cache")
            self.staging = os.path.join(os.path.expanduser(base), digest)
            self._fs = None
        else:
            self.root = os.path.abspath(os.path.expanduser(local_path(root)))
            self.staging = self.root
            self._fs = None

    # -- where things are --------------------------------------------------------------------------

    @property
    def fs(self):
        """The pyarrow file system and the base path inside it (object stores only; made on first use)."""
        if self._fs is None:
            self._fs = filesystem(self.root)
        return self._fs

    def _remote(self, key: str, name: str) -> str:
        return f"{self.fs[1].rstrip('/')}/{key}/{name}"

    def local(self, key: str, name: str) -> str:
        """The local file of ``name``: the entry's file itself for a directory cache; for an object store,
        its staging copy (write there, then :meth:`put`)."""
        return os.path.join(self.staging, key, name)

    def check(self) -> None:
        """ConfigError when the storage cannot be reached (a missing bucket, no credentials, no network)."""
        if not self.remote:
            return
        from pyarrow import fs as pafs

        accepted = ("a reachable directory or object-store URI (s3://bucket/prefix, credentials and endpoint in "
                    "AWS_* environment variables)")
        bucket = self.fs[1].split("/")[0] if self.remote else ""
        try:
            missing = self.fs[0].get_file_info(bucket).type == pafs.FileType.NotFound  # an empty prefix is fine
        except (OSError, ValueError) as error:
            raise ConfigError("storage", self.root, accepted, detail=str(error)) from None
        if missing:
            raise ConfigError("storage", self.root, accepted, detail=f"bucket {bucket!r} does not exist")

    # -- files -------------------------------------------------------------------------------------

    def exists(self, key: str, name: str) -> bool:
        if not self.remote:
            return os.path.exists(self.local(key, name))
        from pyarrow import fs as pafs

        return self.fs[0].get_file_info(self._remote(key, name)).type == pafs.FileType.File

    def read(self, key: str, name: str) -> Optional[dict]:
        """A JSON file of the entry, or None when it is not there (or is damaged: not JSON, with a warning)."""
        try:
            if not self.remote:
                return read_json(self.local(key, name))
            with self.fs[0].open_input_stream(self._remote(key, name)) as stream:
                return json.loads(stream.read().decode("utf-8"))
        except FileNotFoundError:
            return None
        except ValueError as error:
            warn_damaged(key, name, f"not JSON: {error}", "ignoring it")
            return None

    def write(self, key: str, name: str, data: dict) -> None:
        write_json_atomic(data, self.local(key, name))
        self.put(key, name)

    def put(self, key: str, name: str) -> None:
        """Publish the local file of ``name`` (:meth:`local`) in the entry: a no-op for a directory cache,
        an upload (visible once complete) for an object store."""
        if self.remote:
            with open(self.local(key, name), "rb") as source, \
                    self.fs[0].open_output_stream(self._remote(key, name)) as target:
                shutil.copyfileobj(source, target, 1 << 20)

    def fetch(self, key: str, name: str) -> Optional[str]:
        """A local path holding the entry's file ``name`` (downloaded from an object store), or None."""
        path = self.local(key, name)
        if not self.remote:
            return path if os.path.exists(path) else None
        try:
            with self.fs[0].open_input_stream(self._remote(key, name)) as stream:
                write_atomic(path, lambda handle: shutil.copyfileobj(stream, handle, 1 << 20))
        except FileNotFoundError:
            return None
        return path

    def remove(self, key: str, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.local(key, name))
        if self.remote:
            with contextlib.suppress(FileNotFoundError):
                self.fs[0].delete_file(self._remote(key, name))

    def names(self, key: str) -> list[str]:
        """The files of an entry."""
        if not self.remote:
            entry = os.path.join(self.root, key)
            return sorted(os.listdir(entry)) if os.path.isdir(entry) else []
        from pyarrow import fs as pafs

        selector = pafs.FileSelector(f"{self.fs[1].rstrip('/')}/{key}", allow_not_found=True)
        return sorted(info.base_name for info in self.fs[0].get_file_info(selector) if info.type == pafs.FileType.File)

    # -- entries -----------------------------------------------------------------------------------

    def model(self, key: str) -> Optional[dict]:
        """The complete entry's record (``model.json``), or None while the model is missing, unfinished or
        damaged. The record's ``files`` (name -> sha256 and size, written when the entry was published) are
        verified: a missing or damaged file is reported (a warning naming the entry and the file) and the entry
        invalidated, so that the model is trained again. A record without checksums (written before they
        were) only needs ``ema.pt`` to exist."""
        for _ in range(2):
            record = self.read(key, MODEL_FILE)
            if record is None:
                return None
            files = record.get("files")
            if not isinstance(files, dict):
                return record if self.exists(key, "ema.pt") else None
            problem = next(((name, p) for name, p in ((n, self.verify(key, n, e)) for n, e in files.items()) if p),
                           None)
            if problem is None:
                return record
            latest = self.read(key, MODEL_FILE)
            if latest is not None and latest.get("files") != files:
                continue  # published again while this was checked: check the new record
            warn_damaged(key, problem[0], problem[1], "retraining")
            self.invalidate(key)
            return None
        return None

    def has(self, key: str) -> bool:
        return self.model(key) is not None

    def publish_file(self, key: str, name: str) -> dict:
        """Publish the local file ``name`` (:meth:`put`) and return its checksum ({"sha256", "size"}), for the
        record that completes the entry (``model.json``'s ``files``: :meth:`model` verifies them)."""
        digest = file_digest(self.local(key, name))
        self.put(key, name)
        return digest

    def verify(self, key: str, name: str, expected: Optional[dict]) -> Optional[str]:
        """What is wrong with the entry's file ``name`` against its checksum ``expected`` ({"sha256", "size"};
        None: it only has to exist): "missing", a wrong size, "sha256 mismatch", or None when it is whole.
        A file of an object store is downloaded to be checked. A result is kept for the rest of the process
        while the file's identity (inode, size, modification time) stays the same, once that modification
        time is a few seconds old (a later change then shows in it: git's rule for racily clean files)."""
        if not self.remote:
            path = self.local(key, name)
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                return "missing"
            identity = (path, stat.st_ino, stat.st_size, stat.st_mtime_ns)
            size, settled = stat.st_size, time.time() - stat.st_mtime > 2
        else:
            from pyarrow import fs as pafs

            info = self.fs[0].get_file_info(self._remote(key, name))
            if info.type != pafs.FileType.File:
                return "missing"
            identity = (self.root, key, name, info.size, info.mtime_ns)
            size, settled = info.size, info.mtime_ns is not None and time.time() - info.mtime_ns / 1e9 > 5
        if expected is None:
            return None
        identity += (expected.get("sha256"),)
        if identity in _VERIFIED:
            return _VERIFIED[identity]
        if expected.get("size") is not None and size != expected["size"]:
            problem = f"size {size} bytes, {expected['size']} recorded"
        else:
            path = self.fetch(key, name) if self.remote else path
            if path is None:
                return "missing"
            problem = None if file_digest(path)["sha256"] == expected.get("sha256") else "sha256 mismatch"
        if settled:
            _VERIFIED[identity] = problem
        return problem

    def save_checkpoint(self, key: str, save: Callable[[str], None]) -> None:
        """Write the entry's resumable checkpoint with ``save(local path)``, publish it, and record its checksum
        beside it (``checkpoint.json``, removed first: a checkpoint without one is still tried)."""
        self.remove(key, CHECKPOINT_SUM)
        save(self.local(key, CHECKPOINT))
        self.write(key, CHECKPOINT_SUM, self.publish_file(key, CHECKPOINT))

    def checkpoint(self, key: str) -> tuple[Optional[str], Optional[str]]:
        """(a local path of the entry's checkpoint, None), or (None, None) when there is none, or (None, what is
        wrong) when it does not match its checksum: then it is reported and removed (train from step 0)."""
        problem = self.verify(key, CHECKPOINT, self.read(key, CHECKPOINT_SUM))
        if problem == "missing":
            return None, None
        if problem is not None:
            self.discard_checkpoint(key, problem)
            return None, problem
        return self.fetch(key, CHECKPOINT), None

    def discard_checkpoint(self, key: str, problem: str) -> None:
        """Report a damaged checkpoint and remove it (and its checksum)."""
        warn_damaged(key, CHECKPOINT, problem, "training from step 0")
        self.remove(key, CHECKPOINT)
        self.remove(key, CHECKPOINT_SUM)

    def training_run(self, key: str) -> Optional[dict]:
        """The MLflow training run recorded for this key (``run.json``), finished or not."""
        return self.read(key, "run.json")

    def invalidate(self, key: str) -> None:
        """Forget a model (``--no-cache``, or damaged) and what was measured on it; the record goes first, so
        no reader takes half-replaced weights."""
        stale = [n for n in self.names(key) if n.startswith("likelihood-") and n.endswith(".json")]
        for name in (MODEL_FILE, "run.json", CHECKPOINT, CHECKPOINT_SUM, *stale):
            self.remove(key, name)
