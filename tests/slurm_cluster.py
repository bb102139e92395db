"""A throw-away SLURM cluster on localhost: munged, slurmctld and one slurmd per simulated node, all under a
temporary folder, started as child processes and stopped by PID."""
from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")


def missing_binaries() -> list[str]:
    """The SLURM/munge programs that are not installed (empty when a cluster can be started)."""
    found = {name: shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin") for name in DAEMONS}
    return [name for name, path in found.items() if path is None]


def _binary(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise FileNotFoundError(f"{name} is not installed (apt-get install slurmctld slurmd slurm-client munge)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SlurmCluster:
    """``nodes`` simulated nodes with ``cpus`` CPUs each, sharing this host; ``env`` points clients at it."""

    root: Path
    nodes: int = 1
    cpus: int = 2
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def node_names(self) -> list[str]:
        return [f"node{i}" for i in range(1, self.nodes + 1)]

    @property
    def env(self) -> dict[str, str]:
        """The environment of a client of this cluster (sbatch, squeue...) and of the jobs it submits."""
        return {**os.environ, "SLURM_CONF": str(self.conf), "MASTER_ADDR": "127.0.0.1"}

    def start(self, timeout: float = 60.0) -> SlurmCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(exist_ok=True)
        key = self.root / "munge.key"
        subprocess.run([_binary("mungekey"), "--create", "--force", "--keyfile", str(key)], check=True)
        key.chmod(0o400)
        socket_path = self.root / "munge.socket"
        self._spawn([_binary("munged"), "--foreground", "--force", f"--socket={socket_path}", f"--key-file={key}",
                     f"--pid-file={self.root / 'munged.pid'}", f"--log-file={self.root / 'log/munged.log'}",
                     f"--seed-file={self.root / 'munged.seed'}"])
        self._wait(lambda: socket_path.exists(), timeout, "munged did not create its socket")
        self._write_conf(socket_path)
        self._spawn([_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for name in self.node_names:
            self._spawn([_binary("slurmd"), "-D", "-N", name, "-f", str(self.conf)])
        self._wait(self._nodes_idle, timeout, "nodes did not become idle")
        return self

    def stop(self) -> None:
        """Cancels the cluster's jobs, stops the daemons this object started (newest first), then ends, by PID,
        any job process of this cluster that outlived them."""
        if self.processes:
            jobs = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True)
            for job in jobs.stdout.split():
                subprocess.run(["scancel", "--full", job], env=self.env, capture_output=True)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and subprocess.run(
                    ["squeue", "-h"], env=self.env, capture_output=True, text=True).stdout.strip():
                time.sleep(0.5)
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.processes):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()
        for pid in self._job_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _job_processes(self) -> list[int]:
        """PIDs of processes started by this cluster's daemons (their environment names its slurm.conf)."""
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    def run(self, *cmd: str, check: bool = True) -> str:
        """stdout of a client command against this cluster."""
        out = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True)
        if check and out.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
        return out.stdout

    def job_field(self, job_id: str, key: str) -> str | None:
        """One ``key=value`` field of ``scontrol show job``, or None once the job is gone."""
        out = subprocess.run(["scontrol", "show", "job", job_id], env=self.env, capture_output=True, text=True)
        for token in out.stdout.split():
            if token.startswith(f"{key}="):
                return token.split("=", 1)[1]
        return None

    def wait_job(self, job_id: str, states: set[str], timeout: float) -> str:
        """Waits until the job is in one of ``states``; returns the state."""
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s; logs in {self.root / 'log'}")

    def logs(self) -> str:
        return "\n".join(f"==> {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*")))

    def _spawn(self, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{Path(cmd[0]).name}-{len(self.processes)}.out", "wb")
        self.processes.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            dead = [p.args[0] for p in self.processes if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while starting the cluster:\n{self.logs()}")
            time.sleep(0.2)
        raise TimeoutError(f"{what} after {timeout:.0f} s:\n{self.logs()}")

    def _nodes_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        return sorted(states) == self.node_names and all(s == "idle" for s in states.values())

    def _write_conf(self, munge_socket: Path) -> None:
        user, host, r = getpass.getuser(), socket.gethostname(), self.root
        lines = [
            "ClusterName=litscore",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge_socket},cred_expire=5",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "MpiDefault=none",
            "JobRequeue=1",
            "KillWait=10",
        ]
        for name in self.node_names:
            lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} "
                         f"CPUs={self.cpus} State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
