"""Writing files so that a reader never sees half of one: a temporary file in the target directory,
then os.replace (atomic on POSIX, also on a shared file system seen from another node); and the checksum
a later reader verifies a file against (a file can still be damaged after it was written whole)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from typing import Callable, Optional

import torch


def write_atomic(path: str, write: Callable[[io.BufferedWriter], None], mode: Optional[int] = None) -> None:
    """Call ``write(handle)`` on a temporary binary file next to ``path``, then rename it to ``path``
    (with permissions ``mode`` when given); on any error nothing is left behind."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_atomic(obj, path: str) -> None:
    """torch.save, atomically."""
    write_atomic(path, lambda handle: torch.save(obj, handle))


def write_text_atomic(path: str, text: str, mode: Optional[int] = None) -> None:
    write_atomic(path, lambda handle: handle.write(text.encode("utf-8")), mode)


def file_digest(path: str) -> dict:
    """{"sha256": hex digest, "size": bytes} of a file: what a reader checks the file against."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return {"sha256": digest.hexdigest(), "size": size}


def write_json_atomic(data: dict, path: str) -> None:
    """JSON (NaN kept as NaN), atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str))
