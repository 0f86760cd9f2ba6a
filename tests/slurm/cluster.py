"""A one-node Slurm cluster on this machine for the tests (munged, slurmctld and slurmd started in the foreground
from a temporary directory holding key, sockets, state, spool and logs; stopped by pid), and ``Jobs``, which submits
the repository's slurm/ scripts to it and waits for them (no accounting daemon: ``scontrol show job``)."""

import getpass
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from tests.helpers.launch import REPO_ROOT

SLURM_DIR = os.path.join(REPO_ROOT, "slurm")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "squeue", "scancel", "srun")
INSTALL_HINT = ("install Slurm and MUNGE (Debian/Ubuntu: apt-get install slurm-wlm munge; `make test-slurm` does "
                "it when run as root)")
# How long a test waits for one job: a hang detector (a tiny job takes 10-60 s, but the machine may be shared).
JOB_TIMEOUT_S = 900
# States a job does not leave (unless requeued by hand).
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}


class SlurmError(RuntimeError):
    """The cluster did not start, or a job did not do what a test waited for."""


def find_programs() -> dict:
    """Absolute paths of the Slurm/MUNGE programs; SlurmError naming the missing ones."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
    found = {name: shutil.which(name, path=search) for name in DAEMONS + CLIENTS + ("munge",)}
    missing = sorted(name for name, path in found.items() if path is None)
    if missing:
        raise SlurmError(f"Slurm is not installed here (missing: {', '.join(missing)}): {INSTALL_HINT}")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def short_hostname() -> str:
    return subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()


def clean_environ() -> dict:
    """This process's environment without anything a surrounding Slurm job or launcher would leak into ours."""
    env = dict(os.environ)
    for key in list(env):
        if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "PMI_", "PMIX_", "OMPI_")) or key in (
                "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MEGADOREMI_ROOT", "VENV",
                "CONFIG", "RUN_DIR", "EXTRA_ARGS"):
            del env[key]
    return env


class SlurmCluster:
    """``start()`` brings up munged + slurmctld + slurmd with ``CPUs=num_cpus``; ``stop()`` cancels what is still
    queued and terminates exactly the three processes it started."""

    def __init__(self, num_cpus: int = 2, real_memory_mb: int = 4000, cred_expire_s: int = 10,
                 root_prefix: str = "megadoremi-slurm-"):
        self.programs = find_programs()
        self.num_cpus, self.real_memory_mb, self.cred_expire_s = num_cpus, real_memory_mb, cred_expire_s
        # Short and world-traversable: munged insists its socket directory be executable by all, and the socket
        # path must fit in sockaddr_un (pytest's tmp_path is neither).
        self.root = tempfile.mkdtemp(prefix=root_prefix)
        os.chmod(self.root, 0o755)
        self.conf = os.path.join(self.root, "slurm.conf")
        self.munge_socket = os.path.join(self.root, "munge", "munge.socket")
        self.log_dir = os.path.join(self.root, "log")
        self.jobcomp_log = os.path.join(self.log_dir, "jobcomp.txt")
        self.hostname = short_hostname()
        self.processes: dict[str, subprocess.Popen] = {}

    # --------------------------------------------------------------------------------------------- set-up
    def env(self, **extra) -> dict:
        """Environment for Slurm client commands (and the jobs they submit: sbatch exports it)."""
        env = clean_environ()
        env["SLURM_CONF"] = self.conf
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", ""), "/usr/sbin", "/sbin"])
        env.update({key: str(value) for key, value in extra.items()})
        return env

    def _write_munge_key(self) -> str:
        munge_dir = os.path.dirname(self.munge_socket)
        os.makedirs(munge_dir, mode=0o755)
        os.chmod(munge_dir, 0o755)  # umask-proof
        key = os.path.join(munge_dir, "munge.key")
        with open(key, "wb") as handle:
            handle.write(os.urandom(1024))
        os.chmod(key, 0o400)
        return key

    def _conf_settings(self) -> dict:
        """slurm.conf's settings (the node and partition lines come from ``_node_lines``)."""
        user = getpass.getuser()
        return {
            "ClusterName": "megadoremi-test",
            "SlurmctldHost": self.hostname,
            "SlurmctldPort": free_port(),
            "SlurmdPort": free_port(),
            "SlurmUser": user,
            "SlurmdUser": user,
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            # cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
            "AuthInfo": f"socket={self.munge_socket},cred_expire={self.cred_expire_s}",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_CPU",
            # Seconds, not the default minute, between scheduling passes: a requeued job becomes eligible again
            # cred_expire seconds after its requeue and waits for the next pass to start.
            "SchedulerParameters": "sched_interval=2,bf_interval=2",
            # The scripts name their MPI plugin (srun --mpi=pmi2 for preprocessing, --mpi=none for training).
            "MpiDefault": "none",
            "JobRequeue": 1,
            "ReturnToService": 2,
            "SlurmdParameters": "config_overrides",  # CPUs=2 even where the machine has another count
            "MinJobAge": 3600,  # keep finished jobs visible to scontrol for the whole session
            "KillWait": 5,
            "JobCompType": "jobcomp/filetxt",
            "JobCompLoc": self.jobcomp_log,
            "AccountingStorageType": "accounting_storage/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "StateSaveLocation": os.path.join(self.root, "state"),
            "SlurmdSpoolDir": os.path.join(self.root, "spool"),
            "SlurmctldPidFile": os.path.join(self.root, "slurmctld.pid"),
            "SlurmdPidFile": os.path.join(self.root, "slurmd.pid"),
            "SlurmctldLogFile": os.path.join(self.log_dir, "slurmctld.log"),
            "SlurmdLogFile": os.path.join(self.log_dir, "slurmd.log"),
        }

    def _node_lines(self) -> list[str]:
        return [f"NodeName={self.hostname} NodeAddr=127.0.0.1 CPUs={self.num_cpus} RealMemory={self.real_memory_mb} "
                "State=UNKNOWN",
                f"PartitionName=test Nodes={self.hostname} Default=YES MaxTime=INFINITE State=UP"]

    def _write_conf(self) -> None:
        for name in ("state", "spool", "log"):
            os.makedirs(os.path.join(self.root, name), exist_ok=True)
        with open(self.conf, "w") as handle:
            for key, value in self._conf_settings().items():
                handle.write(f"{key}={value}\n")
            for line in self._node_lines():
                handle.write(line + "\n")

    def _client_argv(self, argv: list[str]) -> list[str]:
        """How a client command is run (here: as is; a cluster on network namespaces runs it on its head host)."""
        return argv

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(os.path.join(self.log_dir, f"{name}.stderr"), "wb")
        self.processes[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                                stdin=subprocess.DEVNULL)
        log.close()

    def _munged_argv(self, key: str) -> list[str]:
        munge_dir = os.path.dirname(self.munge_socket)
        return [self.programs["munged"], "--foreground", "--force", f"--key-file={key}",
                f"--socket={self.munge_socket}", f"--pid-file={munge_dir}/munged.pid",
                f"--log-file={self.log_dir}/munged.log", f"--seed-file={munge_dir}/munged.seed"]

    def start(self, timeout_s: float = 60) -> "SlurmCluster":
        key = self._write_munge_key()
        self._write_conf()
        self._spawn("munged", self._munged_argv(key))
        self._wait_for(lambda: os.path.exists(self.munge_socket), timeout_s, "munged to create its socket")
        self._spawn("slurmctld", [self.programs["slurmctld"], "-D", "-f", self.conf])
        self._spawn("slurmd", [self.programs["slurmd"], "-D", "-f", self.conf])
        self._wait_for(self._node_idle, timeout_s, "the node to be idle in sinfo")
        return self

    def _node_idle(self) -> bool:
        result = subprocess.run(self._client_argv([self.programs["sinfo"], "-h", "-N", "-o", "%T"]),
                                capture_output=True, text=True, env=self.env(), timeout=30)
        return result.returncode == 0 and set(result.stdout.split()) == {"idle"}

    def _wait_for(self, condition, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise SlurmError(f"{name} exited with status {process.returncode} while waiting for {what}\n"
                                     f"{self.daemon_logs()}")
            if condition():
                return
            time.sleep(0.25)
        raise SlurmError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{self.daemon_logs()}")

    def daemon_logs(self, num_lines: int = 15) -> str:
        """The last lines of every daemon log, for failure messages."""
        parts = []
        for name in sorted(os.listdir(self.log_dir)) if os.path.isdir(self.log_dir) else []:
            with open(os.path.join(self.log_dir, name), errors="replace") as handle:
                lines = handle.read().splitlines()[-num_lines:]
            parts.append(f"--- {name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # ------------------------------------------------------------------------------------------- tear-down
    def stop(self) -> None:
        """Cancel the jobs still known to the controller, then stop the daemons this object started."""
        try:
            self._cancel_jobs(timeout_s=60)
        finally:
            try:
                self._stop_daemons()
            finally:
                shutil.rmtree(self.root, ignore_errors=True)

    def _cancel_jobs(self, timeout_s: float) -> None:
        """Cancel every job the controller (if it still runs) knows and wait up to ``timeout_s`` for the queue to
        empty."""
        if self.processes.get("slurmctld") and self.processes["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user", getpass.getuser(), check=False)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
                time.sleep(0.5)

    def _stop_daemons(self) -> None:
        # In reverse start order: slurmd first (its job steps are gone by now), the controller, then munged.
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            if process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)

    # ------------------------------------------------------------------------------------------------ jobs
    def run(self, program: str, *args: str, check: bool = True, timeout_s: float = 60, **env_extra):
        """Run a Slurm client program against this cluster."""
        result = subprocess.run(self._client_argv([self.programs.get(program) or program, *args]),
                                capture_output=True, text=True, env=self.env(**env_extra), timeout=timeout_s)
        if check and result.returncode != 0:
            raise SlurmError(f"{program} {shlex.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def sbatch(self, script: str, *args: str, cwd: str, **env_extra) -> int:
        """Submit ``script`` from ``cwd`` (the job's working directory) with ``env_extra`` exported; the job id."""
        result = subprocess.run(self._client_argv([self.programs["sbatch"], "--parsable", *args, script]),
                                capture_output=True, text=True, env=self.env(**env_extra), cwd=cwd, timeout=60)
        if result.returncode != 0:
            raise SlurmError(f"sbatch {script} failed ({result.returncode}): {result.stderr.strip()}")
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, StdOut, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout.strip()
        # One line of Key=Value pairs; the values read here (states, counts, paths) hold no spaces.
        return dict(token.partition("=")[::2] for token in out.split() if "=" in token)

    def wait_job(self, job_id: int, timeout_s: float = JOB_TIMEOUT_S, poll_s: float = 0.5) -> dict:
        """Wait until the job reaches a final state; its ``scontrol`` fields (no sacct: no accounting daemon)."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.job(job_id)
            if info.get("JobState") in FINISHED_STATES:
                return info
            if time.monotonic() > deadline:
                self.run("scancel", str(job_id), check=False)
                raise SlurmError(f"job {job_id} still {info.get('JobState')} after {timeout_s:.0f} s\n"
                                 f"{read_tail(info.get('StdOut'))}")
            time.sleep(poll_s)


class Jobs:
    """Submits the repository's slurm/ scripts from one working directory (logs in ./runs/logs) and waits for them."""

    def __init__(self, cluster: SlurmCluster, workdir: str):
        self.cluster, self.workdir = cluster, workdir
        # The jobs use the interpreter running the tests: its virtualenv, or python from PATH.
        venv = sys.prefix if sys.prefix != sys.base_prefix else ""
        self.base_env = {"MEGADOREMI_ROOT": REPO_ROOT, "VENV": venv}

    def submit(self, script: str, *sbatch_args: str, **env) -> int:
        return self.cluster.sbatch(os.path.join(SLURM_DIR, script), *sbatch_args, cwd=self.workdir,
                                   **self.base_env, **env)

    def wait_completed(self, job_id: int, timeout_s: float = JOB_TIMEOUT_S) -> dict:
        """Wait for the job; assert it COMPLETED with exit code 0 (the log's end in the message if not)."""
        info = self.cluster.wait_job(job_id, timeout_s)
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), \
            f"job {job_id}: {info['JobState']} exit {info['ExitCode']}\n{read_tail(info.get('StdOut'))}"
        return info

    def log(self, info: dict) -> str:
        with open(info["StdOut"], errors="replace") as handle:
            return handle.read()


def read_tail(path: str | None, num_chars: int = 6000) -> str:
    """The end of a job log (for assertion messages)."""
    if not path or not os.path.exists(path):
        return f"(no log at {path})"
    with open(path, errors="replace") as handle:
        return handle.read()[-num_chars:]


def count_lines(path: str) -> int:
    """Non-empty lines of a file (0 if it does not exist yet): how far a run's metrics.jsonl has got."""
    try:
        with open(path) as handle:
            return sum(1 for line in handle if line.strip())
    except FileNotFoundError:
        return 0


def wait_until(cluster: SlurmCluster, job: int, condition, what: str, timeout_s: float = JOB_TIMEOUT_S) -> None:
    """Poll ``condition()`` while the job is queued or running; fail if it ends (or times out) first."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        info = cluster.job(job)
        if info["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING"):
            raise SlurmError(f"job {job} is {info['JobState']} before {what}\n{read_tail(info['StdOut'])}")
        if time.monotonic() > deadline:
            raise SlurmError(f"job {job}: no {what} after {timeout_s:.0f} s\n{read_tail(info['StdOut'])}")
        time.sleep(0.05)
