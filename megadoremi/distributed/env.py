"""Find rank, world size, local rank and the rendezvous address under every launcher we support.

- ``deepspeed`` and ``torchrun`` export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
- ``mpiexec`` / ``mpirun`` (MPICH, Open MPI, PMIx): rank and size from the MPI environment; rank 0's address and a
  free port are broadcast with mpi4py when it is importable (needed across nodes).
- ``srun``: SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID inside a job step; the master is the first host of
  the step's node list, the port derived from the job id (or MASTER_PORT when set).
- otherwise one process.
Discovery exports the torch variables, so ``torch.distributed``'s ``env://`` rendezvous works the same for all.
"""

import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass


def prepare_process_environment() -> None:
    """Settings for DeepSpeed's JIT-compiled ops; entry points call this before DeepSpeed starts.

    DeepSpeed compiles small C++ ops (on CPU: its shared-memory communication op) into TORCH_EXTENSIONS_DIR: keep
    them per environment, so two checkouts or virtualenvs never rebuild each other's copy back and forth. torch
    builds them with whichever ``ninja`` is first on PATH; a system ninja (1.11: log v5, MurmurHash) and the
    environment's pip ninja (1.13: log v7, another hash) each take the other's build for a different command and
    rebuild it (30-100 s per DeepSpeed start), so inside a virtualenv the environment's own ninja goes first.
    Only sets what the user has not set; child processes (launchers' workers) inherit it.
    """
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    bindir = os.path.dirname(sys.executable)
    if sys.prefix != sys.base_prefix and os.path.exists(os.path.join(bindir, "ninja")) \
            and os.environ.get("PATH", "").split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


@dataclass
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torch (deepspeed / torchrun) | mpi | slurm | single

    def export(self) -> None:
        """Set the torch.distributed environment variables from this description."""
        os.environ.update({
            "RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
            "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port),
        })


def _int_env(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return None


def free_port() -> int:
    """A TCP port that was free a moment ago on this host."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """``node[01-03,07],gpu5`` -> [node01, node02, node03, node07, gpu5]; uses scontrol when available."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            if "-" in part:
                low, high = part.split("-")
                hosts.extend(f"{prefix}{i:0{len(low)}d}" for i in range(int(low), int(high) + 1))
            else:
                hosts.append(f"{prefix}{part}")
    return hosts


def _mpi_environment() -> DistributedEnv | None:
    rank = _int_env("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
    size = _int_env("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
    if rank is None:
        return None
    local_rank = _int_env("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK")
    local_size = _int_env("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")
    master_addr = os.environ.get("MASTER_ADDR")
    master_port = _int_env("MASTER_PORT")
    try:
        from mpi4py import MPI
    except ImportError:
        MPI = None
    if MPI is not None:
        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
        hosts = comm.allgather(MPI.Get_processor_name())
        if local_rank is None:
            local_rank = sum(host == hosts[rank] for host in hosts[:rank])
        single_host = len(set(hosts)) == 1
        if master_addr is None:
            master_addr = comm.bcast(
                ("127.0.0.1" if single_host else socket.gethostbyname(socket.gethostname())) if rank == 0 else None
            )
        if master_port is None:
            master_port = comm.bcast(free_port() if rank == 0 else None)
    else:
        if size is None:
            raise RuntimeError("MPI launch detected (rank variable set) but no world size variable; install mpi4py")
        if master_addr is None:
            if local_size is not None and local_size != size:
                raise RuntimeError("multi-node mpirun needs mpi4py (or MASTER_ADDR) to find the rendezvous host")
            master_addr = "127.0.0.1"
        master_port = master_port or 29500
    return DistributedEnv(rank, size, local_rank or 0, master_addr, master_port, "mpi")


def _slurm_environment() -> DistributedEnv | None:
    if os.environ.get("SLURM_STEP_ID") is None or os.environ.get("SLURM_PROCID") is None:
        return None  # in the batch script itself (no srun step): not a parallel launch
    size = _int_env("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") or 1
    rank = _int_env("SLURM_PROCID")
    local_rank = _int_env("SLURM_LOCALID") or 0
    master_addr = os.environ.get("MASTER_ADDR")
    if master_addr is None:
        nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or "localhost"
        hosts = expand_slurm_nodelist(nodelist)
        master_addr = hosts[0] if len(hosts) > 1 else "127.0.0.1"
    job_id = _int_env("SLURM_JOB_ID") or 0
    step_id = _int_env("SLURM_STEP_ID") or 0
    master_port = _int_env("MASTER_PORT") or 20000 + (job_id * 7 + step_id) % 20000
    return DistributedEnv(rank, size, local_rank, master_addr, master_port, "slurm")


def discover_environment() -> DistributedEnv:
    """Describe this process's place in the job, whichever launcher started it (see the module docstring)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return DistributedEnv(
            int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)),
            os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 29500)), "torch",
        )
    for finder in (_mpi_environment, _slurm_environment):
        env = finder()
        if env is not None:
            return env
    port = _int_env("MASTER_PORT") or free_port()
    return DistributedEnv(0, 1, 0, os.environ.get("MASTER_ADDR", "127.0.0.1"), port, "single")


def init_distributed(env: DistributedEnv | None = None, backend: str | None = None, timeout_s: int = 1800):
    """Initialise torch.distributed (through DeepSpeed's comm layer): gloo on CPU, nccl on CUDA."""
    import datetime

    prepare_process_environment()
    import deepspeed
    import torch

    env = env or discover_environment()
    env.export()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    timeout = datetime.timedelta(seconds=timeout_s)
    apply_collective_timeout(timeout)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)
    return env


def apply_collective_timeout(timeout) -> None:
    """Make ``timeout`` the default of every process group, not only the world's.

    init_process_group's timeout covers the world group only: ``torch.distributed.new_group`` without a timeout
    (DeepSpeed's data-parallel, pipeline and ZeRO groups) takes torch's module default, 30 min for gloo and 10 min
    for NCCL, so a rank whose peer's node went off the network waited 30 min in DeepSpeed's gradient all-reduce
    whatever the run asked for. torch reads that default from these two module globals.
    """
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    if hasattr(distributed_c10d, "default_pg_nccl_timeout"):
        distributed_c10d.default_pg_nccl_timeout = timeout


def prebuild_deepspeed_ops() -> None:
    """Compile the ops DeepSpeed would otherwise JIT-compile at the first distributed start (set-up time)."""
    prepare_process_environment()
    import deepspeed  # noqa: F401  (selects the accelerator)
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and builder.is_compatible():
        builder.load(verbose=False)


def describe_rank_failure(error: BaseException, env: DistributedEnv, timeout_s: float | None = None) -> str:
    """One line for a rank that crashed: which rank, on which host, what failed, and for a failed collective
    which peer host it was talking to and what that usually means (a rank died, or its node was lost)."""
    first = (str(error).strip().splitlines() or [""])[0]
    line = f"rank {env.rank} of {env.world_size} on {socket.gethostname()} failed: {type(error).__name__}: {first}"
    peers = []
    for address in dict.fromkeys(re.findall(r"\[?(\d{1,3}(?:\.\d{1,3}){3})\]?:\d+", first)):
        try:
            peers.append(f"{address} = {socket.gethostbyaddr(address)[0]}")
        except OSError:
            peers.append(address)
    if peers:
        line += f" (peer {', '.join(peers)})"
    if "Timed out" in first or "timed out" in first:
        line += (f"; a collective waited parallel.collective_timeout_s={timeout_s:g} s for another rank: that rank "
                 "hung, died or lost its node" if timeout_s else "")
    elif "Connection reset" in first or "Connection closed" in first or "Broken pipe" in first:
        line += "; another rank's process ended (it crashed or was killed, or its node went down)"
    return line
