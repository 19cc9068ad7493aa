"""Two real fleetds (real etcd, real systemd --user managers) whose APIs admit only certificates
signed by the cluster CA: fleetctl reaches them by mTLS, and status is forwarded between them
by mTLS, with no token anywhere."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from fleetpy.cli.fleetctl import cli as fleetctl

pytestmark = pytest.mark.integration
pytest_plugins = ["fixtures_nodes", "fixtures_pki"]

UNIT = "[Service]\nExecStart=/bin/sleep 1000\n[X-Fleet]\nMachineID={machine}\n"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _start_fleetd(node, machine_id: str, port: int, etcd_url: str, prefix: str, pki: Path, log: Path):
    argv = [
        sys.executable, "-m", "fleetpy.fleetd.main",
        "--config", str(node.dir / "none.conf"),
        "--etcd-servers", etcd_url, "--etcd-key-prefix", prefix,
        "--machine-id", machine_id, "--public-ip", "127.0.0.1",
        "--unit-dir", str(node.dir / "fleet-units"), "--api-socket", str(node.dir / "fleet.sock"),
        "--api-listen", f"127.0.0.1:{port}",
        "--api-tls-cert", str(pki / "server.pem"), "--api-tls-key", str(pki / "server.key"),
        "--api-tls-client-ca", str(pki / "ca.pem"),
        "--systemd-bus", node.env["DBUS_SESSION_BUS_ADDRESS"], "--agent-ttl", "5s",
    ]  # fmt: skip
    (node.dir / "none.conf").write_text("")
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=out, start_new_session=True)


def test_mtls_cluster_forwards_status_without_a_token(node_factory, etcd_url, pki, tmp_path):
    prefix = f"/tls-{uuid.uuid4().hex[:8]}/"
    machines = ["a" * 32, "b" * 32]
    ports = [_free_port(), _free_port()]
    nodes = [node_factory("n1"), node_factory("n2")]
    logs = [tmp_path / "fleetd-1.log", tmp_path / "fleetd-2.log"]
    fleetds = [
        _start_fleetd(node, machine, port, etcd_url, prefix, pki, log)
        for node, machine, port, log in zip(nodes, machines, ports, logs, strict=True)
    ]
    tls = ["--ca-file", str(pki / "ca.pem"), "--cert-file", str(pki / "client.pem"),
           "--key-file", str(pki / "client.key")]  # fmt: skip

    def ctl(*args: str):
        return CliRunner().invoke(fleetctl, ["--endpoint", f"https://127.0.0.1:{ports[0]}", *tls, *args])

    try:
        _until(lambda: ctl("list-machines", "--no-legend").output.count("127.0.0.1") == 2, timeout=60)
        (tmp_path / "b.service").write_text(UNIT.format(machine=machines[1]))
        started = ctl("start", str(tmp_path / "b.service"))
        assert started.exit_code == 0, started.output + logs[0].read_text()[-3000:]
        status = ctl("status", "b.service")  # asked of fleetd 1, runs on fleetd 2's machine
        assert status.exit_code == 0 and "active (running)" in status.output, status.output
        certless = CliRunner().invoke(
            fleetctl,
            ["--endpoint", f"https://127.0.0.1:{ports[0]}", "--ca-file", str(pki / "ca.pem"), "list-units"],
        )
        assert certless.exit_code == 1 and "TLS failed" in certless.output

        # B9 at the daemon: fleetd stops within 2 s although a journal -f is open on it.
        (tmp_path / "a.service").write_text(UNIT.format(machine=machines[0]))
        assert ctl("start", str(tmp_path / "a.service")).exit_code == 0
        with socket.socket(socket.AF_UNIX) as follower:
            follower.connect(str(nodes[0].dir / "fleet.sock"))
            follower.sendall(
                b"GET /fleetpy/v1/units/a.service/journal?follow=true&lines=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            follower.settimeout(10)
            assert follower.recv(4096).startswith(b"HTTP/1.1 200")
            stopping = time.monotonic()
            os.killpg(fleetds[0].pid, signal.SIGTERM)
            fleetds[0].wait(30)
            stopped_in = time.monotonic() - stopping
        print(f"fleetd stopped {stopped_in:.2f} s after SIGTERM with a journal -f open")
        assert stopped_in < 2, logs[0].read_text()[-3000:]
    finally:
        for fleetd in fleetds:
            if fleetd.poll() is None:
                os.killpg(fleetd.pid, signal.SIGTERM)
        for fleetd in fleetds:
            try:
                fleetd.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(fleetd.pid, signal.SIGKILL)
                fleetd.wait()
