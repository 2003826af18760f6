"""orchestrator submit / status / logs: Ray Jobs and Slurm batch scripts.

The integration tests start their own Ray head (a dedicated --temp-dir under /tmp, free ports, all
on this machine) and stop only that: SIGTERM to the `ray start --block` process they started, then
SIGKILL to its process group, then any process whose command line names their temp dir, by pid.
They never run `ray stop`, which would stop every Ray instance on the machine.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import pytest
from mlflow.tracking import MlflowClient

from diffusion.errors import ConfigError
from orchestrator import jobs, slurm, submit
from orchestrator.sweepfile import load_sweep
from orchestrator.tracking import LocalServer, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "sweeps", "smoke.yaml")
VENV_BIN = os.path.dirname(sys.executable)
SECRET = "s3cret-value"
PROJECT_PARTS = ("pyproject.toml", "README.md", "diffusion", "orchestrator", "sweeps")


def clean_env(extra=None):
    """This environment without MLflow or Ray addresses (and with the venv first on PATH)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "RAY_", "ORCHESTRATOR_", "SLURM_")) and k != "PYTHONPATH"}
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.update(extra or {})
    return env


def cli(args, cwd, env_extra=None, timeout=300):
    env = clean_env(env_extra)
    env["PYTHONPATH"] = str(cwd) + os.pathsep + ROOT
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def project(tmp_path):
    """A copy of the project directory (what a researcher's checkout holds)."""
    directory = tmp_path / "project"
    directory.mkdir()
    for part in PROJECT_PARTS:
        source = os.path.join(ROOT, part)
        if os.path.isdir(source):
            shutil.copytree(source, directory / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, directory / part)
    return directory


# --------------------------------------------------------------------------------------------------
# unit


def test_submission_id_is_stable_and_changes_with_an_override():
    first = submit.submission_id(load_sweep(SMOKE))
    assert first == submit.submission_id(load_sweep(SMOKE))
    assert re.fullmatch(r"smoke-[0-9a-f]{12}", first)
    changed = submit.submission_id(load_sweep(SMOKE, ["base.train.steps=31"]))
    assert changed != first and changed.startswith("smoke-")
    assert submit.submission_id(load_sweep(SMOKE, ["base.train.steps=31"])) == changed


def test_sbatch_script_lines_and_quoting(tmp_path):
    shutil.copy(SMOKE, tmp_path / "my sweep.yaml")
    result = cli(["submit", "my sweep.yaml", "base.train.steps=5", "grid.seed=[0, 1]", "--slurm", "--dry-run",
                  "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-node", "8", "--partition", "gpu",
                  "--time", "1-02:00:00"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    script = (tmp_path / "smoke.sbatch").read_text()
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    for expected in ("--job-name=smoke", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4", "--cpus-per-task=8",
                     "--partition=gpu", "--time=1-02:00:00", "--output=smoke-%j.out"):
        assert f"#SBATCH {expected}" in sbatch, expected
    assert "SWEEP_FILE='my sweep.yaml'" in script
    assert """python -m orchestrator sweep "$SWEEP_FILE" base.train.steps=5 'grid.seed=[0, 1]' --address""" in script
    assert "ray stop" not in script.replace("never `ray stop`", "")
    assert "sbatch smoke.sbatch" in result.stdout
    assert subprocess.run(["bash", "-n", str(tmp_path / "smoke.sbatch")]).returncode == 0
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".smoke.sbatch")]  # no temporary left


def representative_script(tmp_path, directory="it's \"a\" dir $HOME", **options):
    """A sweep's batch script with every option, from a directory, a file and overrides that need quoting."""
    workdir = tmp_path / directory
    workdir.mkdir(parents=True)
    shutil.copy(SMOKE, workdir / "my sweep.yaml")
    overrides = ["base.train.steps=5", "grid.seed=[0, 1]", "base.data.root=/tmp/it's here"]
    sweep = load_sweep(str(workdir / "my sweep.yaml"), overrides)
    options = options or dict(nodes=3, gpus_per_node=2, cpus_per_node=8, partition="gpu,debug", time="1-02:00:00")
    text = slurm.slurm_script(sweep, str(workdir / "my sweep.yaml"), overrides, slurm.check_slurm_options(**options),
                              str(workdir), "smoke.sbatch", bindir="/opt/my env/bin")
    return workdir, sweep, text


def test_sbatch_script_is_its_template_with_each_value_quoted(tmp_path):
    """The script is templates/sbatch.sh with each @@NAME@@ replaced, the values from the user shell-quoted."""
    workdir, sweep, text = representative_script(tmp_path)
    quoted_workdir = "'" + os.path.realpath(workdir).replace("'", "'\"'\"'") + "'"
    # no --chdir: #SBATCH lines are not shell, and this directory is not a plain path
    sbatch = ["#SBATCH --job-name=smoke", "#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=1",
              "#SBATCH --gpus-per-node=2", "#SBATCH --cpus-per-task=8", "#SBATCH --partition=gpu,debug",
              "#SBATCH --time=1-02:00:00", "#SBATCH --output=smoke-%j.out"]
    values = {"SBATCH": "\n".join(sbatch), "NAME": "smoke", "DIGEST": sweep.digest(), "SCRIPT": "smoke.sbatch",
              "WORKDIR": quoted_workdir, "BINDIR": "'/opt/my env/bin'", "FILE": "'my sweep.yaml'", "GPUS": "2",
              "CPUS": "8", "OVERRIDES": "base.train.steps=5 'grid.seed=[0, 1]' 'base.data.root=/tmp/it'\"'\"'s here' "}
    expected = slurm.template()
    for name, value in values.items():
        assert f"@@{name}@@" in expected, name
        expected = expected.replace(f"@@{name}@@", value)
    assert text == expected and "@@" not in text
    lines = text.splitlines()
    assert lines[:len(sbatch) + 1] == ["#!/bin/bash", *sbatch]
    for line in (f"# Written by `orchestrator submit --slurm` for sweep smoke (digest {sweep.digest()}); edit freely.",
                 "# Submit it with:  sbatch smoke.sbatch", f"cd {quoted_workdir}",
                 """if [ -x '/opt/my env/bin'/ray ]; then PATH='/opt/my env/bin':"$PATH"; export PATH; fi""",
                 "SWEEP_FILE='my sweep.yaml'", "GPUS_PER_NODE=2", 'NUM_CPUS="${SLURM_CPUS_ON_NODE:-8}"',
                 """python -m orchestrator sweep "$SWEEP_FILE" base.train.steps=5 'grid.seed=[0, 1]' """
                 """'base.data.root=/tmp/it'"'"'s here' --address "$RAY_HEAD\""""):
        assert line in lines, line
    # the defaults: one node, no GPU line, the node's CPUs; a plain directory is also the job's --chdir
    sweep = load_sweep(SMOKE)
    text = slurm.slurm_script(sweep, SMOKE, [], slurm.check_slurm_options(), ROOT, "smoke.sbatch", bindir="/b")
    assert text.splitlines()[:6] == ["#!/bin/bash", "#SBATCH --job-name=smoke", "#SBATCH --nodes=1",
                                     "#SBATCH --ntasks-per-node=1", f"#SBATCH --chdir={os.path.realpath(ROOT)}",
                                     "#SBATCH --output=smoke-%j.out"]
    assert 'NUM_CPUS="${SLURM_CPUS_ON_NODE:-$(nproc)}"' in text and "GPUS_PER_NODE=0\n" in text
    assert """python -m orchestrator sweep "$SWEEP_FILE" --address "$RAY_HEAD"\n""" in text


def test_template_placeholders_are_filled_exactly_once():
    assert slurm.render("a @@X@@ b @@Y@@", {"X": "@@Y@@", "Y": "$1"}) == "a @@Y@@ b $1"  # no second pass
    for text, values in (("@@X@@ @@Y@@", {"X": "1"}), ("@@X@@", {"X": "1", "Y": "2"}), ("@@X@@ @@x@@", {"X": "1"})):
        with pytest.raises(ValueError):
            slurm.render(text, values)


def test_sbatch_script_and_its_template_pass_shellcheck(tmp_path):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is not installed; install it (Debian: apt-get install shellcheck, as .ci/run does)")
    # no '$' in the directory: shellcheck's SC2016 (info) asks whether a '$' in single quotes should have
    # expanded, and in a quoted path it should not
    _, _, several = representative_script(tmp_path / "several", directory="it's \"a\" [dir]")
    _, _, one = representative_script(tmp_path / "one", directory="it's \"a\" [dir]", nodes=1)
    for name, text in (("several.sbatch", several), ("one.sbatch", one), ("template.sh", slurm.template())):
        (tmp_path / name).write_text(text)
        result = subprocess.run([shellcheck, "--norc", str(tmp_path / name)], capture_output=True, text=True)
        assert result.returncode == 0, f"{name}:\n{result.stdout}{result.stderr}"


def test_sbatch_script_runs_the_sweep_with_exact_arguments_and_stops_its_ray(tmp_path):
    """The script with stand-ins for `ray` and `python`: the sweep gets exactly the user's arguments
    (a file name with a space, an override with a quote), and the `ray start` it began is stopped."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "ray").write_text(  # `ray status` answers once `ray start` runs
        '#!/bin/bash\necho "ray $*" >> "$STUB_LOG"\n'
        'if [ "$1" = start ]; then echo $$ > "$STUB_LOG.tmp"; mv "$STUB_LOG.tmp" "$STUB_LOG.pid"; exec sleep 300; fi\n'
        'while [ ! -s "$STUB_LOG.pid" ]; do sleep 0.1; done\nexit 0\n')
    (stubs / "python").write_text('#!/bin/bash\nif [ "$1" = -c ]; then echo stub-token; exit 0; fi\n'
                                  'printf "%s\\0" "$@" > "$STUB_LOG.argv"\nexit 0\n')
    for stub in ("ray", "python"):
        os.chmod(stubs / stub, 0o755)
    shutil.copy(SMOKE, tmp_path / "my sweep.yaml")
    overrides = ["base.train.steps=5", "grid.seed=[0, 1]", "base.data.root=/tmp/it's here"]
    sweep = load_sweep(str(tmp_path / "my sweep.yaml"), overrides)
    options = slurm.check_slurm_options(nodes=1, gpus_per_node=0)
    text = slurm.slurm_script(sweep, str(tmp_path / "my sweep.yaml"), overrides, options, str(tmp_path),
                              "smoke.sbatch", bindir=str(stubs))
    (tmp_path / "smoke.sbatch").write_text(text)
    log = tmp_path / "stub.log"
    env = clean_env({"PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "STUB_LOG": str(log),
                     "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_NNODES": "1", "SLURM_CPUS_ON_NODE": "2",
                     "SLURM_JOB_ID": "123", "ORCHESTRATOR_RAY_PORT": "6399"})
    result = subprocess.run(["bash", str(tmp_path / "smoke.sbatch")], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    argv = (tmp_path / "stub.log.argv").read_text().split("\0")[:-1]
    assert argv == ["-m", "orchestrator", "sweep", "my sweep.yaml", *overrides, "--address", "127.0.0.1:6399"]
    calls = log.read_text()
    assert "ray start --head --node-ip-address=127.0.0.1 --port=6399 --num-cpus=2 --num-gpus=0" in calls
    assert "--temp-dir=/tmp/ray-123" in calls and "ray status --address=127.0.0.1:6399" in calls
    assert "stopping the Ray processes this job started" in result.stdout
    assert not alive(int((tmp_path / "stub.log.pid").read_text()))


@pytest.mark.parametrize("flag,value", [
    ("--time", "25:00"), ("--time", "1-25:00:00"), ("--time", "2h"), ("--nodes", "0"), ("--nodes", "two"),
    ("--gpus-per-node", "-1"), ("--partition", "gpu;rm -rf /"), ("--partition", "a b"),
])
def test_bad_slurm_option_exits_2_naming_it(tmp_path, monkeypatch, capsys, flag, value):
    from orchestrator.cli import main

    shutil.copy(SMOKE, tmp_path / "smoke.yaml")
    monkeypatch.chdir(tmp_path)
    assert main(["submit", "smoke.yaml", "--slurm", "--dry-run", f"{flag}={value}"]) == 2
    printed = capsys.readouterr()
    assert printed.err.startswith(f"orchestrator: error: {flag}: invalid value {value!r}; accepted:")
    assert len(printed.err.strip().splitlines()) == 1 and printed.out == ""
    assert not (tmp_path / "smoke.sbatch").exists()


def test_slurm_warns_when_its_gpus_would_sit_idle(tmp_path, monkeypatch, capsys):
    """--gpus-per-node on a sweep whose trials request no GPU: the script is still written, with a warning that
    names the fix; a sweep that requests a fraction of a GPU, or no --gpus-per-node, gets none."""
    from orchestrator.cli import main

    shutil.copy(SMOKE, tmp_path / "smoke.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here: the script is only written
    assert main(["submit", "smoke.yaml", "--slurm", "--gpus-per-node=2"]) == 0
    out = capsys.readouterr().out
    assert "warning: --gpus-per-node 2 allocates GPUs, but no trial of sweep smoke requests one" in out
    assert "base.resources.gpu" in out and (tmp_path / "smoke.sbatch").exists()
    assert main(["submit", "smoke.yaml", "base.resources.gpu=0.5", "--slurm", "--gpus-per-node=2"]) == 0
    assert main(["submit", "smoke.yaml", "--slurm"]) == 0
    assert "warning" not in capsys.readouterr().out


def test_bad_slurm_option_from_the_command_line(tmp_path):
    shutil.copy(SMOKE, tmp_path / "smoke.yaml")
    result = cli(["submit", "smoke.yaml", "--slurm", "--time", "90 minutes"], cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--time: invalid value '90 minutes'" in result.stderr and "HH:MM:SS" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "smoke.sbatch").exists()


def test_loopback_tracking_uri_with_a_remote_cluster_is_refused(project):
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "MLFLOW_TRACKING_USERNAME": "alice",
           "MLFLOW_TRACKING_PASSWORD": SECRET}
    result = cli(["submit", "sweeps/smoke.yaml", "--address", "http://10.255.0.1:8265"], cwd=project, env_extra=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "MLFLOW_TRACKING_URI" in result.stderr and "loopback" in result.stderr
    assert "Traceback" not in result.stderr and SECRET not in result.stdout + result.stderr
    # no URI at all, a local database, and a file outside the project directory are refused too
    result = cli(["submit", "sweeps/smoke.yaml", "--address", "http://10.255.0.1:8265"], cwd=project)
    assert result.returncode == 2 and "MLFLOW_TRACKING_URI" in result.stderr
    result = cli(["submit", "sweeps/smoke.yaml", "--address", "http://10.255.0.1:8265"], cwd=project,
                 env_extra={"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"})
    assert result.returncode == 2 and "MLFLOW_TRACKING_URI" in result.stderr
    result = cli(["submit", SMOKE, "--address", "http://10.255.0.1:8265"], cwd=project,
                 env_extra={"MLFLOW_TRACKING_URI": "http://mlflow.example.org:5000"})
    assert result.returncode == 2 and "FILE" in result.stderr and "current directory" in result.stderr
    # the same loopback URI is fine for a cluster on this machine (checked without contacting it)
    result = cli(["submit", "sweeps/smoke.yaml", "--address", "http://127.0.0.1:8265", "--dry-run"], cwd=project,
                 env_extra=env)
    assert result.returncode == 0, result.stderr


class FakeJobs:
    """The parts of JobSubmissionClient that submit uses, recording what it is given."""

    class Job:
        def __init__(self, submission_id, status="PENDING"):
            self.submission_id, self.status, self.message = submission_id, status, None

    def __init__(self):
        self.jobs, self.submitted = [], []

    def list_jobs(self):
        return list(self.jobs)

    def submit_job(self, **kwargs):
        self.submitted.append(kwargs)
        self.jobs.append(self.Job(kwargs["submission_id"]))
        return kwargs["submission_id"]


def test_credentials_are_never_sent_with_a_job(project, monkeypatch, capsys):
    """Ray writes a job's runtime_env (env_vars included) to its logs and shows it through the job API: the
    submitter's credentials stay home, the settings that are not secret go along, and a URI with
    user:password@ is refused before anything is submitted."""
    monkeypatch.chdir(project)
    for key in [k for k in os.environ if k.startswith(("MLFLOW_", "RAY_", "AWS_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://alice:{SECRET}@mlflow.example.org")
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI.*without user:password") as refused:
        jobs.submit_job("sweeps/smoke.yaml", [], address="http://ray.example.org:8265", client=FakeJobs())
    assert SECRET not in str(refused.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example.org")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET + "-aws")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.internal:9000")
    fake = FakeJobs()
    assert jobs.submit_job("sweeps/smoke.yaml", ["base.train.steps=5"], address="http://ray.example.org:8265",
                           client=fake) == 0
    assert jobs.submit_job("sweeps/smoke.yaml", ["base.train.steps=5"], address="http://ray.example.org:8265",
                           dry_run=True) == 0
    (job,) = fake.submitted
    assert SECRET not in json.dumps(job)
    assert "alice" not in json.dumps(job)
    assert job["runtime_env"]["env_vars"] == {"MLFLOW_TRACKING_URI": "https://mlflow.example.org",
                                              "AWS_ENDPOINT_URL": "http://minio.internal:9000"}
    assert job["entrypoint"] == ("python -m orchestrator sweep sweeps/smoke.yaml base.train.steps=5 --address auto")
    assert job["runtime_env"]["working_dir"] == os.path.realpath(project)
    assert {"/.venv", "/mlartifacts", "/mlflow.db", "/ray_results", "/data", ".env", "*.pt"} <= \
        set(job["runtime_env"]["excludes"])
    assert SECRET not in slurm.slurm_script(load_sweep("sweeps/smoke.yaml"), "sweeps/smoke.yaml", [],
                                            slurm.check_slurm_options(), str(project), "smoke.sbatch")
    assert slurm.submit_slurm("sweeps/smoke.yaml", [], dry_run=True, workdir=str(project)) == 0
    assert SECRET not in (project / "smoke.sbatch").read_text()
    printed = capsys.readouterr()
    assert SECRET not in printed.out + printed.err
    assert printed.out.count("credentials: not sent (MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD, "
                             "AWS_SECRET_ACCESS_KEY)") == 2


def test_resubmission_is_idempotent_and_resubmit_numbers_attempts(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example.org:5000")
    fake = FakeJobs()
    address = "http://ray.example.org:8265"
    base = submit.submission_id(load_sweep("sweeps/smoke.yaml"))
    assert jobs.submit_job("sweeps/smoke.yaml", [], address=address, client=fake) == 0
    assert jobs.submit_job("sweeps/smoke.yaml", [], address=address, client=fake) == 0
    assert [j["submission_id"] for j in fake.submitted] == [base]
    assert f"already submitted as Ray job {base}: PENDING" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--resubmit"):  # the latest attempt has not ended
        jobs.submit_job("sweeps/smoke.yaml", [], address=address, client=fake, resubmit=True)
    fake.jobs[-1].status = "FAILED"
    assert jobs.submit_job("sweeps/smoke.yaml", [], address=address, client=fake) == 0
    assert "--resubmit" in capsys.readouterr().out and len(fake.submitted) == 1
    monkeypatch.setattr(jobs, "_unfinished_run", lambda sweep, uris: True)
    assert jobs.submit_job("sweeps/smoke.yaml", [], address=address, client=fake, resubmit=True) == 0
    assert fake.submitted[-1]["submission_id"] == f"{base}-2"
    assert fake.submitted[-1]["entrypoint"].endswith("--address auto --resume")
    fake.jobs[-1].status = "STOPPED"
    monkeypatch.setattr(jobs, "_unfinished_run", lambda sweep, uris: False)
    assert jobs.submit_job("sweeps/smoke.yaml", [], address=address, client=fake, resubmit=True) == 0
    assert fake.submitted[-1]["submission_id"] == f"{base}-3"
    assert fake.submitted[-1]["entrypoint"].endswith("--address auto")
    # MLflow out of reach from here: "cannot tell" (the new attempt then runs the sweep again)
    monkeypatch.undo()
    assert jobs._unfinished_run(load_sweep(SMOKE), ["http://127.0.0.1:1", None]) is None


def test_default_job_server_address(monkeypatch):
    for key in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    assert submit.default_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert submit.default_address() == "http://head:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://jobs:8265")
    assert submit.default_address() == "http://jobs:8265"


# --------------------------------------------------------------------------------------------------
# integration: a real Ray head with its job server, a real MLflow server, and the Slurm script run by bash


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One classifier feature-extractor cache for the sweeps of this module."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def server(tmp_path):
    srv = LocalServer(str(tmp_path)).start()
    yield srv
    srv.stop()


def short_temp_dir(prefix):
    """Ray's temp dir: short, since Ray's socket paths under it are limited to about 107 characters."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def ports(count):
    chosen = set()
    while len(chosen) < count:
        chosen.add(free_port())
    return sorted(chosen)


def alive(pid):
    """Whether ``pid`` runs (a zombie waiting for its parent does not)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def processes_under(temp_dir):
    """Pids of the live processes whose command line names ``temp_dir`` or that run in it (a job's
    driver runs in its working_dir, unpacked there): that Ray session's only."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read().decode(errors="replace")
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if (temp_dir in cmdline or cwd == temp_dir or cwd.startswith(temp_dir + os.sep)) and alive(entry):
            found.append(int(entry))
    return found


def process_group(pgid):
    """Pids of the live processes of process group ``pgid`` (Ray's worker processes rename themselves,
    ray::IDLE and such, but stay in the group of the `ray start` that started their node)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry))
    return found


def wait_until_gone(pids, timeout=20.0):
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    return [pid for pid in pids if alive(pid)]


def kill_leftovers(temp_dir):
    """SIGKILL, by pid, the processes of the session in ``temp_dir`` that are still alive."""
    leftovers = processes_under(temp_dir)
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    wait_until_gone(leftovers)
    return leftovers


def remove_temp_dir(temp_dir):
    """Remove a Ray temp dir; a file written during the shutdown (metrics discovery) may recreate it once."""
    for _ in range(5):
        shutil.rmtree(temp_dir, ignore_errors=True)
        time.sleep(1)
        if not os.path.exists(temp_dir):
            return


@contextmanager
def ray_head(env):
    """A Ray head with its job server, on this machine only, with its own temp dir and ports."""
    temp_dir = short_temp_dir("rj")
    gcs, dashboard, agent, client_port = ports(4)
    log = open(temp_dir + ".log", "wb")
    process = subprocess.Popen(
        [os.path.join(VENV_BIN, "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
         "--dashboard-agent-listen-port", str(agent), "--ray-client-server-port", str(client_port),
         "--num-cpus", "2", "--temp-dir", temp_dir, "--block"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, open(temp_dir + ".log").read()[-3000:]
            request = urllib.request.Request(url + "/api/version")
            if env.get("RAY_AUTH_TOKEN"):
                request.add_header("Authorization", "Bearer " + env["RAY_AUTH_TOKEN"])
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        break
            except urllib.error.HTTPError as error:
                raise AssertionError(f"the job server answers {error.code}") from None
            except OSError:
                pass
            assert time.monotonic() < deadline, "the Ray head's job server did not answer"
            time.sleep(2)
        yield url, temp_dir
    finally:
        # stop this head only: `ray start --block` tears down its own node on SIGTERM
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                pass
        if wait_until_gone(process_group(process.pid)):  # its own group: new session at Popen
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.close()
        kill_leftovers(temp_dir)
        remove_temp_dir(temp_dir)
        os.unlink(temp_dir + ".log")


def jobs_at(url, env_extra):
    """The jobs of a job server (in a subprocess: the token is read from its environment)."""
    code = ("import json, sys; from ray.job_submission import JobSubmissionClient; "
            "jobs = JobSubmissionClient(sys.argv[1]).list_jobs(); "
            "print(json.dumps([{'id': j.submission_id, 'entrypoint': j.entrypoint, 'metadata': j.metadata} "
            "for j in jobs]))")
    result = subprocess.run([sys.executable, "-c", code, url], env=clean_env(env_extra), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def evaluation_runs(client, experiment_name):
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None, f"no experiment {experiment_name}"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("stage") == "evaluate"]


@pytest.mark.integration
def test_ray_job_runs_the_sweep_once(project, server, cache_dir):
    token = os.urandom(16).hex()  # token authentication, as on the compose stack, with a token of this test
    ray_env = clean_env({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    tracking = {"MLFLOW_TRACKING_URI": server.uri, "MLFLOW_TRACKING_USERNAME": "alice",
                "MLFLOW_TRACKING_PASSWORD": SECRET, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    args = ["sweeps/smoke.yaml", "base.train.steps=10", f"base.eval.cache_dir={cache_dir}"]
    with ray_head(ray_env) as (url, _):
        result = cli(["submit", *args, "--address", url], cwd=project, env_extra=tracking)
        assert result.returncode == 0, result.stdout + result.stderr
        job_id = submit.submission_id(load_sweep(str(project / "sweeps/smoke.yaml"), args[1:]))
        assert f"as Ray job {job_id}" in result.stdout
        assert SECRET not in result.stdout + result.stderr

        deadline = time.monotonic() + 600
        while True:
            status = cli(["status", job_id, "--address", url], cwd=project, env_extra=tracking)
            assert status.returncode == 0, status.stderr
            if re.search(r": (SUCCEEDED|FAILED|STOPPED)", status.stdout) or time.monotonic() > deadline:
                break
            time.sleep(10)
        logs = cli(["logs", job_id, "--address", url], cwd=project, env_extra=tracking)
        assert f"{job_id}: SUCCEEDED" in status.stdout, status.stdout + logs.stdout[-5000:]
        assert logs.returncode == 0 and "sweep smoke: 2 trial(s)" in logs.stdout and "fid_reference" in logs.stdout
        assert SECRET not in logs.stdout + status.stdout

        (job,) = jobs_at(url, tracking)
        assert job["id"] == job_id and SECRET not in job["entrypoint"] + json.dumps(job["metadata"])
        runs = evaluation_runs(MlflowClient(server.uri), "smoke")
        assert sorted(r.data.tags["variant"] for r in runs) == ["ddpm", "ncsn"]
        assert all(r.info.status == "FINISHED" for r in runs)
        # what --resubmit checks: the sweep's MLflow run finished, so there is nothing to resume
        assert jobs._unfinished_run(load_sweep(str(project / "sweeps/smoke.yaml"), args[1:]), [server.uri]) is False

        again = cli(["submit", *args, "--address", url], cwd=project, env_extra=tracking)
        assert again.returncode == 0, again.stderr
        assert f"already submitted as Ray job {job_id}: SUCCEEDED" in again.stdout
        assert [job["id"] for job in jobs_at(url, tracking)] == [job_id]  # no second job


@pytest.mark.integration
def test_slurm_script_runs_the_sweep_on_one_node_and_stops_its_ray(project, server, cache_dir):
    args = ["sweeps/smoke.yaml", "base.train.steps=10", f"base.eval.cache_dir={cache_dir}"]
    generated = cli(["submit", *args, "--slurm", "--dry-run"], cwd=project)
    assert generated.returncode == 0, generated.stderr
    assert "sbatch smoke.sbatch" in generated.stdout
    temp_dir = short_temp_dir("rs")
    gcs, agent, client_port = ports(3)
    env = clean_env({
        "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_NNODES": "1", "SLURM_CPUS_ON_NODE": "2", "SLURM_JOB_ID": "123",
        "MLFLOW_TRACKING_URI": server.uri, "MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": SECRET,
        # this machine runs other Ray instances: a port, a temp dir and agent ports of this test's own
        "ORCHESTRATOR_RAY_PORT": str(gcs), "ORCHESTRATOR_RAY_TMPDIR": temp_dir,
        "ORCHESTRATOR_RAY_START_ARGS": f"--dashboard-agent-listen-port={agent} --ray-client-server-port={client_port}",
        # no token file: the script makes a token for its cluster
        "RAY_AUTH_TOKEN_PATH": os.path.join(temp_dir, "no-token"),
        "PYTHONPATH": str(project),
    })
    process = subprocess.Popen(["bash", "smoke.sbatch"], cwd=project, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, output[-5000:]
        assert "sweep smoke: 2 trial(s)" in output and "stopping the Ray processes this job started" in output
        assert SECRET not in output
        runs = evaluation_runs(MlflowClient(server.uri), "smoke")
        assert sorted(r.data.tags["variant"] for r in runs) == ["ddpm", "ncsn"]
        assert all(r.info.status == "FINISHED" for r in runs)
        # the script's Ray processes are all gone: those of the script's process group (the `ray start` it
        # ran in the background and its node's processes) and any naming or running in its temp dir
        assert wait_until_gone(process_group(process.pid)) == [], "the script left Ray processes running"
        assert processes_under(temp_dir) == [], "the script left Ray processes running"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # the script's trap stops its Ray
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                pass
        if wait_until_gone(process_group(process.pid), timeout=5):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        kill_leftovers(temp_dir)
        remove_temp_dir(temp_dir)
