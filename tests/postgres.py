"""A throwaway PostgreSQL cluster of Debian's ``postgresql`` package (.ci/run installs it): initdb in a temporary
directory, the server on 127.0.0.1 and a free port, its unix socket in that directory, password authentication
(scram-sha-256) for every connection. PostgreSQL refuses to run as root: a test run as root runs initdb and the
server as the ``postgres`` user (``nobody`` where there is none) through ``runuser``, in a directory that user
owns. Without the server binaries the test is skipped on a developer's machine and fails where ``CI`` is set."""
import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile

import pytest

from orchestrator.tracking import free_port

LOOPBACK = "127.0.0.1"


def server_bin() -> str:
    """The directory of the newest installed PostgreSQL's initdb, pg_ctl and createdb (skip or fail without)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda path: [int(part) for part in re.findall(r"\d+", path)])
    if found:
        return os.path.dirname(found[-1])
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return os.path.dirname(on_path)
    message = ("PostgreSQL's server is needed (no /usr/lib/postgresql/*/bin/initdb: apt-get install postgresql, "
               "as .ci/run does)")
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class Cluster:
    """``Cluster(user, password, database).start()``: a cluster whose superuser is ``user`` with ``password``
    and a database ``database`` owned by it; ``port``, ``directory``; ``stop()`` stops it and removes the
    directory. The password reaches initdb through a file removed right after, and createdb through
    PGPASSWORD: it is on no command line."""

    def __init__(self, user: str, password: str, database: str):
        self.user, self.password, self.database = user, password, database
        self.bin = server_bin()
        # /tmp itself, not pytest's per-user directory (0700, which the server's user could not enter); short
        # enough for the unix socket's path
        self.directory = tempfile.mkdtemp(prefix="pg", dir="/tmp")
        self.data = os.path.join(self.directory, "data")
        self.log = os.path.join(self.directory, "postgres.log")
        self.port = free_port(LOOPBACK)
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                account = pwd.getpwnam("nobody")
            os.chown(self.directory, account.pw_uid, account.pw_gid)
            self.as_user = ["runuser", "-u", account.pw_name, "--"]
            self.owner = (account.pw_uid, account.pw_gid)
        else:
            self.owner = None

    def _run(self, *command: str, env=None) -> None:
        result = subprocess.run([*self.as_user, *command], cwd=self.directory, env=env, capture_output=True,
                                text=True, timeout=120)
        if result.returncode != 0:
            log = open(self.log).read()[-3000:] if os.path.exists(self.log) else ""
            raise RuntimeError(f"{os.path.basename(command[0])} failed ({result.returncode}):\n{result.stdout[-3000:]}"
                               f"{result.stderr[-3000:]}\n{log}")

    def start(self) -> "Cluster":
        password_file = os.path.join(self.directory, "password")
        with open(os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(self.password)
        if self.owner:
            os.chown(password_file, *self.owner)
        try:
            self._run(os.path.join(self.bin, "initdb"), "--pgdata", self.data, "--username", self.user,
                      "--pwfile", password_file, "--auth", "scram-sha-256", "--encoding", "UTF8", "--locale", "C.UTF-8",
                      "--no-sync")
        finally:
            os.unlink(password_file)
        # loopback only; the socket in this directory; no durability (a test's data)
        options = (f"-c listen_addresses={LOOPBACK} -p {self.port} -c unix_socket_directories={self.directory} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._run(os.path.join(self.bin, "pg_ctl"), "start", "--wait", "--timeout", "60", "--pgdata", self.data,
                  "--log", self.log, "-o", options)
        try:
            env = {**os.environ, "PGPASSWORD": self.password}
            subprocess.run([os.path.join(self.bin, "createdb"), "--host", LOOPBACK, "--port", str(self.port),
                            "--username", self.user, "--owner", self.user, self.database], env=env, check=True,
                           capture_output=True, timeout=60)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown: open connections are ended) and remove the directory. Idempotent."""
        try:
            if os.path.exists(os.path.join(self.data, "postmaster.pid")):
                try:
                    self._run(os.path.join(self.bin, "pg_ctl"), "stop", "--wait", "--timeout", "30", "--pgdata",
                              self.data, "--mode", "fast")
                except (RuntimeError, subprocess.TimeoutExpired):
                    self._run(os.path.join(self.bin, "pg_ctl"), "stop", "--wait", "--timeout", "30", "--pgdata",
                              self.data, "--mode", "immediate")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
