"""Fixtures shared by several test modules."""
import os
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from orchestrator.tracking import LocalServer, free_port

S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_EC2_METADATA_DISABLED")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """An S3-compatible server on loopback in its own process (moto's server; no internet, nothing
    mocked inside this process): the environment a client needs to reach it, with throwaway keys."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("s3") / "server.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                raise RuntimeError(f"the S3 server did not start (see {log.name})")
            time.sleep(0.2)
    yield {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret",
           "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket on the S3 server, with this process's environment pointing at it; its name."""
    from pyarrow import fs as pafs

    for name in S3_ENV:
        monkeypatch.setenv(name, s3_server[name])
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=s3_server["AWS_ENDPOINT_URL"].split("://")[1], scheme="http",
                      allow_bucket_creation=True).create_dir(bucket)
    return bucket


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One classifier feature-extractor and reference-feature cache for every sweep of the session (of each xdist
    worker): the classifier is trained once, not once per module (entries are keyed and written atomically)."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LocalServer(str(tmp_path_factory.mktemp("mlflow"))).start()
    yield srv
    srv.stop()
