"""A Ray cluster of several nodes on this machine, for trying multi-node sweeps, the tests and the benchmarks.

Each node is `ray start ... --block` in its own process group, so one node can be stopped alone (what a lost
worker node looks like to Ray Tune) and stopping the cluster kills its processes and no other Ray instance's.
Token authentication is on (RAY_AUTH_MODE=token with a fresh RAY_AUTH_TOKEN): a driver joins with the
cluster's ``env``, e.g. ``orchestrator sweep FILE --address <cluster.address>``.

    cluster = LocalCluster()
    cluster.start_node("head", cpus=1, resources={"node_a": 1})
    cluster.start_node("worker", cpus=1, resources={"node_b": 1})
    ...
    cluster.stop()
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from .tracking import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


class LocalCluster:
    """Ray nodes started with `ray start ... --block`, each in its own process group so that one node can
    be stopped alone and every process of this cluster (and of no other Ray on the machine) is killed at
    the end. The token makes the nodes and the driver authenticate (RAY_AUTH_MODE=token)."""

    def __init__(self):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Ray puts sockets under the temp dir: keep its path short
        self.temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0",
                        PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p))
        self.nodes: dict[str, subprocess.Popen] = {}

    def start_node(self, name: str, cpus: int, resources: dict) -> None:
        head = not self.nodes
        args = [RAY, "start", "--block", f"--num-cpus={cpus}", f"--resources={json.dumps(resources)}"]
        args += (["--head", "--node-ip-address=127.0.0.1", f"--port={self.port}", f"--temp-dir={self.temp_dir}",
                  "--include-dashboard=false"] if head else [f"--address={self.address}"])
        log = open(os.path.join(self.temp_dir, f"{name}.log"), "w")
        self.nodes[name] = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self.wait_for_nodes(len(self.nodes))

    def alive(self) -> int:
        result = subprocess.run([RAY, "status", f"--address={self.address}"], env=self.env, capture_output=True,
                                text=True, timeout=60)
        if result.returncode != 0 or "Active:" not in result.stdout:
            return 0
        active = result.stdout.split("Active:", 1)[1].split("Pending:", 1)[0]
        return sum(1 for line in active.splitlines() if line.strip().startswith("1 node_"))

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.alive() == count:
                return
            time.sleep(1)
        raise RuntimeError(f"the Ray cluster did not reach {count} node(s)")

    def node_id(self, name: str) -> str:
        """The Ray node id of the live node that has the custom resource ``name``."""
        code = ("import ray, json; ray.init(address='%s', logging_level='ERROR'); "
                "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))" % self.address)
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        nodes = json.loads(out.stdout.strip().splitlines()[-1])
        return next(node for node, resources in nodes.items() if name in resources)

    def stop_node(self, name: str) -> None:
        process = self.nodes.pop(name)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def stop(self) -> None:
        for name in list(self.nodes)[::-1]:
            self.stop_node(name)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
