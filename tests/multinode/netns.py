"""Hosts on network namespaces, and a Slurm cluster whose nodes are those hosts, for the multi-node tests.

``Fabric`` makes one network namespace per host (``mdmn<pid>-<host>``), a bridge ``mdmn<pid>br`` in the machine's
own namespace joining them through veth pairs ``mdmn<pid>v<K>`` (``eth0`` inside), and an address 10.213.0.<10+K>
each. The bridge has no address (IPv4 or IPv6) and does not pass its traffic to iptables, so the hosts reach each
other and nothing else (no route out, the machine itself is not on their network, and a firewall that drops
forwarded packets, as Docker's does, does not cut them off). A process runs on a host in the host's network namespace plus its own UTS namespace (the
hostname is the host's name: ``hostname`` in a job says ``node2`` as on a cluster) and mount namespace, in which a
hosts file naming every host (``/tmp/mdmn<pid>-fabric-*/hosts``) is bind-mounted over /etc/hosts: names resolve
inside the hosts, and the machine's /etc/hosts is never written. Everything else of the filesystem stays shared, as
on a cluster with a shared filesystem (and /sys stays the machine's, with its cgroup mount, which slurmd needs;
``ip netns exec`` would mount a fresh sysfs without it).

``NetSlurmCluster`` runs munged and slurmctld on the host ``head`` and one ``slurmd -N nodeK`` on each compute
host (``CPUs=1`` each; the machine has 2 cores); the tests' client commands (sbatch, scontrol, ...) run on ``head``.

Tear-down is by pid and by name: the processes inside each namespace (``ip netns pids``, whoever started them: the
daemons, job steps, ranks), then the namespaces, links and folders (hosts files, the cluster state). Everything carries the owner's
pid in its name, so ``sweep_leftovers()`` (run before every start, and by ``python -m tests.multinode.netns --sweep``) removes
what a killed run left behind without touching a concurrent run's hosts. ``python -m tests.multinode.netns --check``
lists whatever is left.
"""

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from megadoremi.utils.fs import process_alive
from tests.slurm.cluster import SlurmCluster, SlurmError

SUBNET = "10.213.0"
SSH_CLIENT_CONFIG = "/etc/ssh/ssh_config"
FABRIC_DIR_PREFIX = "-fabric-"
# Names this module gives: namespaces mdmn<hex pid>-<host>, links mdmn<hex pid>br / mdmn<hex pid>v<K>, folders
# /tmp/mdmn<hex pid>-fabric-* (hosts and ssh client files) and /tmp/mdmn<hex pid>-slurm-* (the cluster's state).
PREFIX = "mdmn"
NAMESPACE_RE = re.compile(rf"^{PREFIX}([0-9a-f]+)-(head|node[0-9]+)$")
LINK_RE = re.compile(rf"^{PREFIX}([0-9a-f]+)(br|v[0-9]+)$")
FABRIC_DIR_RE = re.compile(rf"^{PREFIX}([0-9a-f]+)-(fabric|slurm)-")
INSTALL_HINT = "the multi-node tests need root and iproute2 (ip netns); `make test-multinode` runs them as root"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise SlurmError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def namespace_pids(namespace: str) -> list[int]:
    result = _ip("netns", "pids", namespace, check=False)
    return [int(pid) for pid in result.stdout.split()] if result.returncode == 0 else []


def kill_namespace_processes(namespace: str, timeout_s: float = 20) -> None:
    """SIGTERM every process in the namespace, SIGKILL what is left after ``timeout_s``, wait until none is left."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 30)):
        for pid in namespace_pids(namespace):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while namespace_pids(namespace) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not namespace_pids(namespace):
            return
    raise SlurmError(f"processes left in namespace {namespace}: {namespace_pids(namespace)}")


def leftovers(tag: str | None = None) -> dict:
    """Namespaces, links and folders with this module's names (of owner ``tag``, or any)."""
    def ours(match):
        return match is not None and (tag is None or f"{PREFIX}{match.group(1)}" == tag)

    namespaces = [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.strip()]
    links = [line.split(":")[1].strip().split("@")[0]
             for line in _ip("-o", "link", "show", check=False).stdout.splitlines() if ":" in line]
    tmp = tempfile.gettempdir()
    return {"namespaces": sorted(name for name in namespaces if ours(NAMESPACE_RE.match(name))),
            "links": sorted(name for name in links if ours(LINK_RE.match(name))),
            "folders": sorted(os.path.join(tmp, name) for name in os.listdir(tmp)
                                  if ours(FABRIC_DIR_RE.match(name)))}


def remove(found: dict) -> None:
    """Remove what ``leftovers`` found: processes in the namespaces first, then namespaces, links, hosts files."""
    for namespace in found["namespaces"]:
        kill_namespace_processes(namespace, timeout_s=5)
        _ip("netns", "delete", namespace, check=False)
    for link in sorted(found["links"], key=lambda name: name.endswith("br")):  # veths, then the bridge
        _ip("link", "delete", link, check=False)
    for folder in found["folders"]:
        shutil.rmtree(folder, ignore_errors=True)


def _owner(name: str) -> int:
    """The pid in the name of a namespace, link or fabric folder this module made."""
    base = os.path.basename(name)
    return int((NAMESPACE_RE.match(base) or LINK_RE.match(base) or FABRIC_DIR_RE.match(base)).group(1), 16)


def _of_dead_owners(found: dict) -> dict:
    """What ``leftovers`` found, restricted to runs whose owner process no longer exists."""
    return {key: [name for name in names if not process_alive(_owner(name))] for key, names in found.items()}


def sweep_leftovers() -> dict:
    """Remove what runs whose owner process is gone left behind (a kill -9, a machine reset); returns it."""
    dead = _of_dead_owners(leftovers())
    remove(dead)
    return dead


class Fabric:
    """Hosts on network namespaces behind one bridge (see the module docstring); ``up()`` / ``down()``."""

    def __init__(self, hosts: list[str], tag: str | None = None):
        self.tag = tag or f"{PREFIX}{os.getpid():x}"
        self.hosts = list(hosts)
        self.addresses = {host: f"{SUBNET}.{10 + index}" for index, host in enumerate(self.hosts)}
        self.bridge = f"{self.tag}br"
        self.dir = None
        # Files bind-mounted over the machine's inside the hosts: {path on the hosts: the fabric's file}; and more
        # shell commands run in every host process's mount namespace before the program.
        self.binds: dict[str, str] = {}
        self.setup: list[str] = []

    def namespace(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def hosts_file(self) -> str:
        lines = ["127.0.0.1 localhost"] + [f"{address} {host}" for host, address in self.addresses.items()]
        return "\n".join(lines) + "\n"

    def up(self) -> "Fabric":
        if shutil.which("ip") is None or os.geteuid() != 0:
            raise SlurmError(INSTALL_HINT)
        sweep_leftovers()
        self.dir = tempfile.mkdtemp(prefix=self.tag + FABRIC_DIR_PREFIX)
        os.chmod(self.dir, 0o755)
        with open(os.path.join(self.dir, "hosts"), "w") as handle:
            handle.write(self.hosts_file())
        self.binds["/etc/hosts"] = os.path.join(self.dir, "hosts")
        try:
            _ip("link", "add", self.bridge, "type", "bridge", "nf_call_iptables", "0", "nf_call_ip6tables", "0")
            _ip("link", "set", self.bridge, "addrgenmode", "none")  # no IPv6 link-local address either
            _ip("link", "set", self.bridge, "up")
            for index, host in enumerate(self.hosts):
                namespace, veth = self.namespace(host), f"{self.tag}v{index}"
                _ip("netns", "add", namespace)
                _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
                _ip("link", "set", veth, "addrgenmode", "none")
                _ip("link", "set", veth, "master", self.bridge, "up")
                _ip("-n", namespace, "addr", "add", f"{self.addresses[host]}/24", "dev", "eth0")
                _ip("-n", namespace, "link", "set", "eth0", "up")
                _ip("-n", namespace, "link", "set", "lo", "up")
        except BaseException:
            self.down()
            raise
        return self

    def argv(self, host: str, argv: list[str], setup: str = "") -> list[str]:
        """``argv`` run on ``host``: in its network namespace, a UTS namespace named after it and a mount
        namespace with the fabric's files over the machine's (``binds``: /etc/hosts, ...); ``setup``: more shell
        commands run there first (as root, inside that mount namespace)."""
        steps = [f"mount --bind {shlex.quote(source)} {shlex.quote(target)}" for target, source in self.binds.items()]
        steps += self.setup + ([setup] if setup else [])
        steps += ['hostname "$0"', 'exec "$@"']
        return ["nsenter", f"--net=/run/netns/{self.namespace(host)}", "unshare", "--uts", "--mount",
                "--propagation", "private", "--", "sh", "-c", " && ".join(steps), host, *argv]

    def pids(self, host: str) -> list[int]:
        return namespace_pids(self.namespace(host))

    def set_link(self, host: str, state: str) -> None:
        """Cut (``down``) or restore (``up``) the host's cable to the bridge."""
        _ip("link", "set", f"{self.tag}v{self.hosts.index(host)}", state)

    def down(self) -> None:
        """Stop every process on the hosts and remove the namespaces, links and hosts files; raise if anything
        is left."""
        remove(leftovers(self.tag))
        deadline = time.monotonic() + 30
        while any(leftovers(self.tag).values()) and time.monotonic() < deadline:
            time.sleep(0.2)  # a namespace's interfaces go away asynchronously after its last process
            remove(leftovers(self.tag))
        left = leftovers(self.tag)
        if any(left.values()):
            raise SlurmError(f"could not remove {left}")


class NetSlurmCluster(SlurmCluster):
    """munged + slurmctld on ``head``, one ``slurmd -N nodeK`` per compute host, every host its own network
    namespace (``Fabric``); the client commands run on ``head``."""

    def __init__(self, num_nodes: int = 2, cpus_per_node: int = 1, slurmd_timeout_s: int = 10, ssh: bool = False,
                 **kwargs):
        if ssh:
            for program in ("sshd", "ssh", "ssh-keygen", "pdsh"):
                if shutil.which(program, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
                    raise SlurmError(f"{program} is not installed: apt-get install openssh-server pdsh "
                                     "(`make test-multinode` does it as root)")
            if not os.path.exists(SSH_CLIENT_CONFIG):
                raise SlurmError(f"{SSH_CLIENT_CONFIG} is missing (openssh-client): the hosts' ssh config is "
                                 "mounted over it")
        self.fabric = Fabric(["head"] + [f"node{index}" for index in range(1, num_nodes + 1)])
        # The cluster's folder carries the fabric's tag, so a sweep after a killed run removes it too.
        super().__init__(num_cpus=cpus_per_node, root_prefix=f"{self.fabric.tag}-slurm-", **kwargs)
        self.nodes = self.fabric.hosts[1:]
        self.hostname = "head"
        self.slurmd_timeout_s = slurmd_timeout_s
        self.ssh = ssh

    def _conf_settings(self) -> dict:
        settings = super()._conf_settings()
        settings.update({
            "ClusterName": "megadoremi-multinode",
            "SlurmctldHost": f"head({self.fabric.addresses['head']})",
            "SlurmctldPort": 6817,  # every host has its own ports
            "SlurmdPort": 6818,
            # One spool, pid file and log per node (%n: the node name), on the shared filesystem.
            "SlurmdSpoolDir": os.path.join(self.root, "spool", "%n"),
            "SlurmdPidFile": os.path.join(self.root, "slurmd-%n.pid"),
            "SlurmdLogFile": os.path.join(self.log_dir, "slurmd-%n.log"),
            # A node that stops answering is marked DOWN (and its jobs ended) after this long.
            "SlurmdTimeout": self.slurmd_timeout_s,
        })
        return settings

    def _node_lines(self) -> list[str]:
        lines = [f"NodeName={node} NodeAddr={self.fabric.addresses[node]} CPUs={self.num_cpus} "
                 f"RealMemory={self.real_memory_mb} State=UNKNOWN" for node in self.nodes]
        lines.append(f"PartitionName=test Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        return lines

    def _client_argv(self, argv: list[str]) -> list[str]:
        return self.fabric.argv("head", argv)

    def start(self, timeout_s: float = 60) -> "NetSlurmCluster":
        self.fabric.up()
        key = self._write_munge_key()
        self._write_conf()
        for node in self.nodes:
            os.makedirs(os.path.join(self.root, "spool", node))
        self._spawn("munged", self.fabric.argv("head", self._munged_argv(key)))
        self._wait_for(lambda: os.path.exists(self.munge_socket), timeout_s, "munged to create its socket")
        self._spawn("slurmctld", self.fabric.argv("head", [self.programs["slurmctld"], "-D", "-f", self.conf]))
        if self.ssh:
            self._start_sshd()
        for node in self.nodes:
            self.start_slurmd(node)
        self._wait_for(self._node_idle, timeout_s, "every node to be idle in sinfo")
        if self.ssh:
            self._wait_for(self._ssh_works, timeout_s, "ssh from node1 to every node")
        return self

    def _start_sshd(self) -> None:
        """Passwordless ssh between the hosts, as DeepSpeed's pdsh launcher needs: one sshd per compute host
        (its host key, config and authorized key in the cluster's directory), and an ssh client config naming
        the key, bind-mounted over /etc/ssh/ssh_config inside the hosts only (the machine's ssh files and
        ~/.ssh are not touched)."""
        ssh_dir = os.path.join(self.root, "ssh")
        os.makedirs(ssh_dir, mode=0o700)
        for key in ("host_key", "id_ed25519"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(ssh_dir, key)],
                           check=True, capture_output=True, timeout=30)
        shutil.copy(os.path.join(ssh_dir, "id_ed25519.pub"), os.path.join(ssh_dir, "authorized_keys"))
        sshd_config = os.path.join(ssh_dir, "sshd_config")
        with open(sshd_config, "w") as handle:
            handle.write(f"Port 22\nHostKey {ssh_dir}/host_key\nAuthorizedKeysFile {ssh_dir}/authorized_keys\n"
                         "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                         "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n"
                         "AcceptEnv none\nLogLevel ERROR\n")
        ssh_config = os.path.join(ssh_dir, "ssh_config")
        with open(ssh_config, "w") as handle:
            handle.write(f"Host *\n  IdentityFile {ssh_dir}/id_ed25519\n  StrictHostKeyChecking no\n"
                         "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n")
        self.fabric.binds[SSH_CLIENT_CONFIG] = ssh_config
        # ssh reads ~/.ssh/config before /etc/ssh/ssh_config: hide the machine's ~/.ssh inside the hosts.
        self.fabric.setup.append('if [ -d "$HOME/.ssh" ]; then mount -t tmpfs tmpfs "$HOME/.ssh"; fi')
        sshd = shutil.which("sshd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
        for node in self.nodes:
            # sshd needs its privilege-separation directory /run/sshd: a private /run for this sshd only.
            self._spawn(f"sshd-{node}", self.fabric.argv(node, [sshd, "-D", "-e", "-f", sshd_config],
                                                         setup="mount -t tmpfs tmpfs /run && mkdir /run/sshd"))

    def _ssh_works(self) -> bool:
        result = subprocess.run(self.fabric.argv(self.nodes[0], ["pdsh", "-R", "ssh", "-w", ",".join(self.nodes),
                                                                 "hostname"]),
                                capture_output=True, text=True, timeout=30)
        return result.returncode == 0 and sorted(result.stdout.split()[1::2]) == self.nodes

    def start_slurmd(self, node: str) -> None:
        self._spawn(f"slurmd-{node}", self.fabric.argv(node, [self.programs["slurmd"], "-D", "-N", node,
                                                              "-f", self.conf]))

    def stop(self) -> None:
        """Cancel the jobs and stop the daemons, then every process left on the hosts and the hosts themselves,
        and only then remove the cluster's folder (job steps may still write into it until they are stopped)."""
        try:
            self._cancel_jobs(timeout_s=30)
        finally:
            try:
                self._stop_daemons()
            finally:
                try:
                    self.fabric.down()
                finally:
                    shutil.rmtree(self.root, ignore_errors=True)


def hold(fail: bool) -> int:
    """Start a cluster (with ssh) and a 2-node job that sleeps, print "ready <tag>" and wait: for the tear-down
    tests, which interrupt or kill this process."""
    # Ctrl-C as in a terminal, even when started from a shell that ignores SIGINT (a background job, nohup).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cluster = NetSlurmCluster(ssh=True)
    try:
        cluster.start()
        job = cluster.run("sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--output=/dev/null",
                          "--wrap", "srun --mpi=none sleep 600").stdout.strip()
        deadline = time.monotonic() + 60
        while cluster.job(int(job)).get("JobState") != "RUNNING" or len(cluster.fabric.pids("node2")) < 3:
            if time.monotonic() > deadline:
                raise SlurmError(f"job {job} did not start")
            time.sleep(0.2)
        if fail:
            raise RuntimeError("failing on purpose after start")
        print(f"ready {cluster.fabric.tag}", flush=True)
        time.sleep(600)
    finally:
        cluster.stop()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="list what runs whose owner is gone left behind; exit 1 if there is anything")
    parser.add_argument("--sweep", action="store_true", help="remove what runs whose owner is gone left behind "
                                                             "(after --check)")
    parser.add_argument("--hold", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fail", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hold:
        return hold(args.fail)
    status = 0
    if args.check:
        left = _of_dead_owners(leftovers())
        if any(left.values()):
            print(f"left behind by earlier runs: {left}", file=sys.stderr)
            status = 1
    if args.sweep:
        removed = sweep_leftovers()
        if any(removed.values()):
            print(f"removed {removed}")
    return status


if __name__ == "__main__":
    sys.exit(main())
