"""Health checks and `fleetctl rolling-replace` on a real lab (etcd, systemd --user managers,
fleetd in network namespaces): 5 instances of an HTTP template with a health check, replaced one
at a time while a sampler counts healthy instances every 0.2 s (never fewer than 4); a version
whose check fails stops at the first instance and rolls it back; a unit whose check starts
failing is restarted by its agent, with a UnitUnhealthy event, while list-units shows health."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from labtools import short_lab_dir, wait_for

from fleetpy.client import Client
from fleetpy.lab.lab import Lab

pytestmark = pytest.mark.integration

INSTANCES = 5


def fleetctl(lab: Lab, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLEETCTL_ENDPOINT": lab.endpoint()}
    argv = [sys.executable, "-m", "fleetpy.cli.fleetctl", *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, check=False)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def template(version: str, path: str = "/") -> str:
    # Each instance serves its own port on the node's loopback; the check asks it for `path`.
    return (
        "[Service]\n"
        f"Environment=VERSION={version}\n"
        "ExecStart=/usr/bin/python3 -m http.server 80%i --bind 127.0.0.1 --directory /\n"
        "[X-Fleet]\n"
        f"HealthCheckHTTP=http://127.0.0.1:80%i{path}\n"
        # Loose enough for a loaded 2-core machine, where a Python server may take a second to answer.
        "HealthCheckInterval=2s\nHealthCheckTimeout=2s\nHealthCheckThreshold=3\nHealthCheckStartPeriod=5s\n"
    )


class HealthySampler:
    """Counts, every 0.2 s, the instances whose published health is healthy; keeps the minimum."""

    def __init__(self, endpoint: str):
        self.client = Client(endpoint, timeout=10)
        self.samples: list[int] = []
        self.log: list[str] = []  # what the cluster showed whenever an instance was not healthy
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def healthy(self) -> int:
        states = self.client.unit_states()
        return sum(
            1
            for s in states
            if s["name"].startswith("web@") and (s.get("health") or {}).get("status") == "healthy"
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            count = self.healthy()
            self.samples.append(count)
            if count < INSTANCES:
                self.log.append(
                    f"{time.monotonic():.1f} "
                    + " ".join(
                        f"{s['name']}:{s['hash'][:5]}:{s['systemdActiveState']}:{s.get('health')}"
                        for s in self.client.unit_states()
                    )
                )
            time.sleep(0.2)

    def __enter__(self) -> HealthySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.client.close()


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with short_lab_dir("frr") as path:
        argv = [
            sys.executable, "-m", "fleetpy.cli.fleetpy", "lab", "up", "--dir", str(path),
            "--nodes", "3", "--etcd-members", "1", "--agent-ttl", "2s",
        ]  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        yield Lab(path)


def test_rolling_replace_keeps_n_minus_1_healthy_and_a_bad_version_rolls_back(
    lab: Lab, tmp_path: Path
) -> None:
    unit = tmp_path / "web@.service"
    unit.write_text(template("1"))
    started = time.monotonic()
    fleetctl(lab, "start", *(str(tmp_path / f"web@{i}.service") for i in range(1, INSTANCES + 1)))
    sampler = HealthySampler(lab.endpoint())
    wait_for("every instance healthy", lambda: sampler.healthy() == INSTANCES, 60, 0.2)
    start_all = time.monotonic() - started

    units = json.loads(fleetctl(lab, "list-units", "-o", "json").stdout)
    assert {u["health"]["status"] for u in units} == {"healthy"}
    wide = fleetctl(lab, "list-units", "-o", "wide").stdout.splitlines()
    assert "HEALTH" in wide[0].split() and all("healthy" in line.split() for line in wide[1:])

    unit.write_text(template("2"))
    with sampler:
        result = fleetctl(lab, "rolling-replace", str(unit), "--max-unavailable", "1")
    print(f"\n{result.stdout}")
    replaced_line = result.stdout.splitlines()[-1]
    took = float(replaced_line.rsplit(" in ", 1)[1].rstrip("s"))
    print(
        f"rolling replace of {INSTANCES} instances: {took:.1f}s (baseline, starting all {INSTANCES} at once "
        f"until healthy: {start_all:.1f}s); fewest healthy during it: {min(sampler.samples)} "
        f"of {INSTANCES} in {len(sampler.samples)} samples"
    )
    assert replaced_line.startswith(f"Replaced {INSTANCES} instances of web@.service with ")
    assert min(sampler.samples) >= INSTANCES - 1, (sampler.samples, sampler.log)
    hashes = {u["hash"] for u in json.loads(fleetctl(lab, "list-units", "-o", "json").stdout)}
    assert len(hashes) == 1

    # v3 answers 404 on its check path: web@1 goes unhealthy, the run stops there and rolls back.
    unit.write_text(template("3", path="/no-such-file-v3"))
    with HealthySampler(lab.endpoint()) as bad_run:
        result = fleetctl(lab, "rolling-replace", str(unit), "--timeout", "60", check=False)
    print(result.stdout + result.stderr)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "stopped at web@1.service: unhealthy: GET http://127.0.0.1:801/no-such-file-v3: HTTP/1.0 404" in (
        result.stderr
    )
    assert "Replacing web@2.service" not in result.stdout
    assert min(bad_run.samples) >= INSTANCES - 1, bad_run.samples
    wait_for("every instance healthy again", lambda: sampler.healthy() == INSTANCES, 60, 0.2)
    assert {u["hash"] for u in json.loads(fleetctl(lab, "list-units", "-o", "json").stdout)} == hashes


def test_a_unit_whose_check_fails_is_restarted_with_an_event(lab: Lab, tmp_path: Path) -> None:
    flag = tmp_path / "ok"
    flag.touch()
    os.chmod(tmp_path, 0o755)
    (tmp_path / "probe.service").write_text(
        "[Service]\nExecStart=/bin/sleep 1000\n"
        f"[X-Fleet]\nHealthCheckExec=/usr/bin/test -f {flag}\nHealthCheckInterval=1s\nHealthCheckThreshold=2\n"
    )
    fleetctl(lab, "start", str(tmp_path / "probe.service"))

    def health() -> dict:
        states = Client(lab.endpoint()).unit_states(unit_name="probe.service")
        return (states[0].get("health") or {}) if states else {}

    wait_for("probe healthy", lambda: health().get("status") == "healthy", 30, 0.2)
    flag.unlink()
    wait_for("probe restarted", lambda: health().get("restarts", 0) >= 1, 30, 0.2)
    events = fleetctl(lab, "events", "--unit", "probe.service").stdout
    assert "UnitUnhealthy" in events and "restarting it (restart 1)" in events, events
    status = fleetctl(lab, "status", "probe.service").stdout
    assert "Health: " in status and "UnitUnhealthy" in status, status
    flag.touch()
    wait_for("probe healthy again", lambda: health().get("status") == "healthy", 30, 0.2)
    restarts = health()["restarts"]
    time.sleep(3)
    assert health()["restarts"] == restarts  # healthy: never restarted again
