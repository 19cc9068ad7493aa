"""Benchmark: fleetpy side by side with CoreOS fleet (Go) on the same real nodes and etcd.

Three real systemd --user nodes and one etcd (v2 on, since Go fleet knows no other API) serve
both clusters in turn: first fleetpy's fleetds (v3 registry), then Go fleetd v1.0 run as fleet
ran on CoreOS, a user service with a socket unit (`systemd_user`, its API on the socket). Each
cluster is driven by its own fleetctl and timed against systemd itself: a unit counts as started
when its node's manager reports it active, not when a fleetctl says so. The floor under both,
in the same run on the same nodes: a raw StartUnit over D-Bus until the unit is active.

Go fleetd and fleetctl are built from fleet's source (docs/fleetctl-go.md); give their paths with
--go-fleetd/--go-fleetctl or FLEETD_GO/FLEETCTL_GO. Needs root (it starts nodes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import etcd, summary, table
from bench.fleetd import cpu_s, rss_mib

NODES = ("n1", "n2", "n3")
GO_PREFIX = "/gofleet/"
PY_PREFIX = "/fleetpy-side/"
UNIT = "[Unit]\nDescription=side by side {name}\n\n[Service]\nExecStart=/bin/sleep infinity\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--units", type=int, help="units started at once (default 60; --quick 6)")
    parser.add_argument("--singles", type=int, help="single starts timed (default 20; --quick 3)")
    parser.add_argument("--idle", type=float, help="seconds of idle CPU sampling (default 10; --quick 2)")
    parser.add_argument("--go-fleetd", default=os.environ.get("FLEETD_GO", "/tmp/fleetd-go"))
    parser.add_argument("--go-fleetctl", default=os.environ.get("FLEETCTL_GO", "/tmp/fleetctl-go"))


class Systemd:
    """Reads which bench units each node's manager has active, straight over the node's bus."""

    def __init__(self, nodes: list) -> None:
        self.addresses = [n.env["DBUS_SESSION_BUS_ADDRESS"] for n in nodes]
        self.loop = asyncio.new_event_loop()
        self.managers = self.loop.run_until_complete(self._connect())

    async def _connect(self) -> list:
        from dbus_next.aio import MessageBus

        managers = []
        for address in self.addresses:
            bus = await MessageBus(bus_address=address).connect()
            path = "/org/freedesktop/systemd1"
            proxy = bus.get_proxy_object(
                "org.freedesktop.systemd1", path, await bus.introspect("org.freedesktop.systemd1", path)
            )
            managers.append(proxy.get_interface("org.freedesktop.systemd1.Manager"))
        return managers

    def active(self, prefix: str) -> dict[str, int]:
        """Unit name -> index of the node where it is active."""

        async def read() -> dict[str, int]:
            found: dict[str, int] = {}
            for i, manager in enumerate(self.managers):
                for row in await manager.call_list_units_by_patterns(["active"], [f"{prefix}*"]):
                    found[row[0]] = i
            return found

        return self.loop.run_until_complete(read())

    def wait(self, prefix: str, count: int, timeout: float = 120.0) -> float:
        started = time.monotonic()
        while len(self.active(prefix)) < count:
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"only {len(self.active(prefix))} of {count} {prefix}* units active")
            time.sleep(0.01)
        return time.monotonic()


def wait_for(what: str, check, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


class Cluster:
    """One scheduler on the three nodes: how to start it, drive it and read its fleetds."""

    name = ""

    def __init__(self, nodes: list, url: str, work: Path, fleetctl: list[str]) -> None:
        self.nodes, self.url, self.work, self.fleetctl = nodes, url, work, fleetctl
        self.pids: list[int] = []
        self.procs: list[subprocess.Popen] = []

    def ctl(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [*self.fleetctl, *args], capture_output=True, text=True, timeout=timeout, cwd=self.work
        )
        if done.returncode != 0:
            raise RuntimeError(f"{self.name} fleetctl {' '.join(args[:2])}: {done.stderr.strip()[-500:]}")
        return done

    def machines(self) -> int:
        """How many machines the cluster lists (0 while its API is not up yet)."""
        try:
            out = self.ctl("list-machines", "--no-legend").stdout
        except RuntimeError:
            return 0
        return len([line for line in out.splitlines() if line.strip()])


class Fleetpy(Cluster):
    name = "fleetpy"

    def start(self) -> None:
        for node in self.nodes:
            argv = [
                sys.executable, "-m", "fleetpy.fleetd.main",
                "--etcd-servers", self.url, "--etcd-api", "v3", "--etcd-key-prefix", PY_PREFIX,
                "--unit-dir", str(node.dir / "py-units"), "--api-socket", str(node.dir / "fleet.sock"),
                "--systemd-bus", "user",
            ]  # fmt: skip
            with open(node.dir / "fleetd.log", "ab") as log:
                self.procs.append(node.popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log))
            self.pids.append(self.procs[-1].pid)
        wait_for("fleetpy's fleetds did not all register", lambda: self.machines() == len(self.nodes))

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(timeout=20)


GO_SOCKET = "[Socket]\nListenStream={sock}\n"
GO_SERVICE = """[Service]
Environment=FLEET_ETCD_SERVERS={url} FLEET_ETCD_KEY_PREFIX={prefix} FLEET_SYSTEMD_USER=true
Environment=FLEET_UNITS_DIRECTORY={units} FLEET_PUBLIC_IP=127.0.0.1
ExecStart={fleetd}
"""


class GoFleet(Cluster):
    name = "fleet (Go)"

    def __init__(self, *args, fleetd: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fleetd = fleetd

    def start(self) -> None:
        for node in self.nodes:
            units = Path(node.env["XDG_RUNTIME_DIR"]) / "systemd" / "user"
            units.mkdir(parents=True, exist_ok=True)
            (units / "gofleet.socket").write_text(GO_SOCKET.format(sock=node.dir / "gofleet.sock"))
            (units / "gofleet.service").write_text(
                GO_SERVICE.format(
                    url=self.url, prefix=GO_PREFIX, units=node.dir / "go-units", fleetd=self.fleetd
                )
            )
            node.run(["systemctl", "--user", "daemon-reload"], check=True)
            node.run(["systemctl", "--user", "start", "gofleet.socket", "gofleet.service"], check=True)
            shown = node.run(
                ["systemctl", "--user", "show", "-p", "MainPID", "--value", "gofleet.service"], check=True
            )
            self.pids.append(int(shown.stdout.strip()))
        wait_for("Go fleetds did not all register", lambda: self.machines() == len(self.nodes))

    def stop(self) -> None:
        for node in self.nodes:
            node.run(["systemctl", "--user", "stop", "gofleet.service", "gofleet.socket"])


def measure(cluster: Cluster, systemd: Systemd, units: int, singles: int, idle: float, tag: str) -> dict:
    cluster.start()
    try:
        time.sleep(1.0)
        before = [cpu_s(p) for p in cluster.pids]
        time.sleep(idle)
        result = {
            "scheduler": cluster.name,
            "idle_rss_mib": [rss_mib(p) for p in cluster.pids],
            "idle_cpu_pct": round(
                100
                * sum(cpu_s(p) - b for p, b in zip(cluster.pids, before, strict=True))
                / idle
                / len(cluster.pids),
                2,
            ),
        }
        names = []
        for i in range(units):
            name = f"{tag}-many{i}.service"
            (cluster.work / name).write_text(UNIT.format(name=name))
            names.append(name)
        before = [cpu_s(p) for p in cluster.pids]
        started = time.monotonic()
        ctl = subprocess.Popen(
            [*cluster.fleetctl, "start", *names],
            cwd=cluster.work,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        all_active = systemd.wait(f"{tag}-many", units) - started
        ctl.wait(timeout=300)
        result[f"start_{units}"] = {
            "all_active_s": round(all_active, 2),
            "fleetctl_returned_s": round(time.monotonic() - started, 2),
            "fleetctl_rc": ctl.returncode,
            "fleetd_cpu_s": round(sum(cpu_s(p) - b for p, b in zip(cluster.pids, before, strict=True)), 2),
            "per_node": sorted(
                list(systemd.active(f"{tag}-many").values()).count(i) for i in range(len(NODES))
            ),
        }
        cluster.ctl("destroy", *names)
        wait_for("the many units did not stop", lambda: not systemd.active(f"{tag}-many"), 120)
        samples = []
        for i in range(singles):
            name = f"{tag}-one{i}.service"
            (cluster.work / name).write_text(UNIT.format(name=name))
            started = time.monotonic()
            ctl = subprocess.Popen(
                [*cluster.fleetctl, "start", name],
                cwd=cluster.work,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            samples.append(systemd.wait(name, 1) - started)
            ctl.wait(timeout=60)
            cluster.ctl("destroy", name)
        wait_for("the single units did not stop", lambda: not systemd.active(f"{tag}-one"), 120)
        result["single_start"] = summary(samples)
        return result
    finally:
        cluster.stop()


RAW_TEMPLATE = "rawstart@.service"


async def raw_starts(bus: str, count: int) -> list[float]:
    """The floor under any scheduler: StartUnit of an installed unit over D-Bus until its job is
    done (the unit is active), through the D-Bus class fleetd's agent uses; a new instance each time."""
    from fleetpy.systemd import SystemdBus

    manager = await SystemdBus.connect(bus)
    samples = []
    try:
        for i in range(count):
            started = time.monotonic()
            result = await manager.run_job("StartUnit", RAW_TEMPLATE.replace("@", f"@{i}"))
            samples.append(time.monotonic() - started)
            if result != "done":
                raise RuntimeError(f"raw StartUnit: job {result}")
        for i in range(count):
            await manager.run_job("StopUnit", RAW_TEMPLATE.replace("@", f"@{i}"))
    finally:
        await manager.close()
    return samples


def raw_baseline(node, count: int) -> dict:
    units = Path(node.env["XDG_RUNTIME_DIR"]) / "systemd" / "user"
    units.mkdir(parents=True, exist_ok=True)
    (units / RAW_TEMPLATE).write_text(UNIT.format(name=RAW_TEMPLATE))
    node.run(["systemctl", "--user", "daemon-reload"], check=True)
    return summary(asyncio.run(raw_starts(node.env["DBUS_SESSION_BUS_ADDRESS"], count)))


def run(args: argparse.Namespace) -> dict:
    from fleetpy.lab.node import start_node

    for binary in (args.go_fleetd, args.go_fleetctl):
        if not os.access(binary, os.X_OK):
            raise SystemExit(f"{binary}: not found; build Go fleet as docs/fleetctl-go.md says (fleetd too)")
    units = args.units or (6 if args.quick else 60)
    singles = args.singles or (3 if args.quick else 20)
    idle = args.idle or (2.0 if args.quick else 10.0)
    with etcd() as url, tempfile.TemporaryDirectory(prefix="gf-") as base:
        work = Path(base) / "work"
        work.mkdir()
        nodes = []
        try:
            for name in NODES:
                nodes.append(start_node(name, Path(base), journald=False))
            systemd = Systemd(nodes)
            sock = nodes[0].dir / "fleet.sock"
            fleetpy = Fleetpy(
                nodes,
                url,
                work,
                [sys.executable, "-m", "fleetpy.cli.fleetctl", "--endpoint", f"unix://{sock}"],
            )
            go_sock = nodes[0].dir / "gofleet.sock"
            go = GoFleet(
                nodes, url, work, [args.go_fleetctl, "--endpoint", f"unix://{go_sock}"], fleetd=args.go_fleetd
            )
            rows = [
                measure(c, systemd, units, singles, idle, tag) for c, tag in ((go, "go"), (fleetpy, "py"))
            ]
            raw = raw_baseline(nodes[0], singles)
        finally:
            for node in nodes:
                node.kill()
            shutil.rmtree(base, ignore_errors=True)
    version = subprocess.run([args.go_fleetd, "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "nodes": len(NODES),
        "units": units,
        "go_fleetd": version,
        "results": rows,
        "baseline_raw_start_unit": raw,
    }


def render(result: dict) -> str:
    rows = []
    for r in result["results"]:
        many = next(v for k, v in r.items() if k.startswith("start_"))
        rows.append(
            {
                "scheduler": r["scheduler"],
                f"{result['units']} units active s": many["all_active_s"],
                "fleetd CPU s": many["fleetd_cpu_s"],
                "single p50 ms": r["single_start"]["p50_ms"],
                "single p95 ms": r["single_start"]["p95_ms"],
                "idle RSS MiB": max(r["idle_rss_mib"]),
                "idle CPU %": r["idle_cpu_pct"],
            }
        )
    raw = result["baseline_raw_start_unit"]
    rows.append(
        {
            "scheduler": "systemd alone (raw StartUnit)",
            "single p50 ms": raw["p50_ms"],
            "single p95 ms": raw["p95_ms"],
        }
    )
    return table(rows)
