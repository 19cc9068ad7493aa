"""Health checks and `fleetctl rolling-replace` on a real lab (etcd, systemd --user managers,
fleetd in network namespaces): 5 instances of an HTTP template with a health check, replaced one
at a time while a sampler counts healthy instances every 0.2 s (never fewer than 4); a version
whose check fails stops at the first instance and rolls it back; the same two at a time (batches
of 2, 2 and 1, each healthy before the next; never fewer than 3), and a failing batch of 2 rolled
back; a unit whose check starts failing is restarted by its agent, with a UnitUnhealthy event,
while list-units shows health. bench/rolling.py times both batch sizes."""

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
from labtools import lab_up, wait_for

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


def template(version: str, path: str = "/", port: str = "80") -> str:
    # Each instance serves its own port (`port` then the instance number) on the node's
    # loopback; the check asks it for `path`.
    return (
        "[Service]\n"
        f"Environment=VERSION={version}\n"
        f"ExecStart=/usr/bin/python3 -m http.server {port}%i --bind 127.0.0.1 --directory /\n"
        "[X-Fleet]\n"
        f"HealthCheckHTTP=http://127.0.0.1:{port}%i{path}\n"
        # Loose enough for a loaded 2-core machine, where a Python server may take a second to answer.
        "HealthCheckInterval=2s\nHealthCheckTimeout=2s\nHealthCheckThreshold=3\nHealthCheckStartPeriod=5s\n"
    )


class HealthySampler:
    """Counts, every 0.2 s, the instances whose published health is healthy; keeps the minimum."""

    def __init__(self, endpoint: str, prefix: str = "web@"):
        self.prefix = prefix
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
            if s["name"].startswith(self.prefix) and (s.get("health") or {}).get("status") == "healthy"
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
                        if s["name"].startswith(self.prefix)
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
    with lab_up(
        "frr",
        "--nodes", "3", "--etcd-members", "1", "--agent-ttl", "2s",
    ) as lab:  # fmt: skip
        yield lab


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


def batches_of(output: str, template: str) -> list[list[str]]:
    """The batches a rolling replace printed: a batch ends once each of its instances was
    reported healthy, so an instance replaced before that counts into the same batch."""
    unit = template.split("@")[0]
    found: list[list[str]] = []
    healthy: set[str] = set()
    for line in output.splitlines():
        words = line.split()
        if line.startswith(f"Replacing {unit}@"):
            if not found or set(found[-1]) <= healthy:
                found.append([])
            found[-1].append(words[1])
        elif line.startswith(f"Unit {unit}@") and words[2] == "healthy":
            healthy.add(words[1])
    assert found and all(set(batch) <= healthy for batch in found), output
    return found


def test_rolling_replace_two_at_a_time_keeps_three_healthy_and_rolls_back_two_at_a_time(
    lab: Lab, tmp_path: Path
) -> None:
    # Its own template on its own ports, so it does not depend on the test above.
    unit = tmp_path / "api@.service"
    unit.write_text(template("1", port="81"))
    fleetctl(lab, "start", *(str(tmp_path / f"api@{i}.service") for i in range(1, INSTANCES + 1)))
    sampler = HealthySampler(lab.endpoint(), prefix="api@")
    wait_for("every instance healthy", lambda: sampler.healthy() == INSTANCES, 60, 0.2)

    unit.write_text(template("2", port="81"))
    with sampler:
        result = fleetctl(lab, "rolling-replace", str(unit), "--max-unavailable", "2")
    print(f"\n{result.stdout}")
    assert batches_of(result.stdout, "api@.service") == [
        ["api@1.service", "api@2.service"],
        ["api@3.service", "api@4.service"],
        ["api@5.service"],
    ]
    lines = result.stdout.splitlines()
    assert [line for line in lines if line.endswith(" replaced")] == [
        "2/5 replaced",
        "4/5 replaced",
        "5/5 replaced",
    ]
    # 2 of 5 down at most: never fewer than 3 healthy (a sample every 0.2 s).
    assert min(sampler.samples) >= INSTANCES - 2, (sampler.samples, sampler.log)
    assert min(sampler.samples) < INSTANCES  # it did take instances down, more than one at a time
    good = {
        u["hash"] for u in json.loads(fleetctl(lab, "list-units", "-o", "json").stdout) if "api@" in u["name"]
    }
    assert len(good) == 1

    # v3 answers 404 on its check: the first batch (api@1 and api@2) fails, and both go back.
    unit.write_text(template("3", path="/no-such-file-v3", port="81"))
    with HealthySampler(lab.endpoint(), prefix="api@") as bad_run:
        result = fleetctl(
            lab, "rolling-replace", str(unit), "--max-unavailable", "2", "--timeout", "60", check=False
        )
    print(result.stdout + result.stderr)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "rolling replace of api@.service stopped at api@" in result.stderr
    assert "404" in result.stderr and "rolled back 2 instances to their old content" in result.stderr
    assert "Replacing api@3.service" not in result.stdout
    rolled = [line.split()[2] for line in result.stdout.splitlines() if line.startswith("Rolled back ")]
    assert sorted(rolled) == ["api@1.service", "api@2.service"], result.stdout
    assert min(bad_run.samples) >= INSTANCES - 2, bad_run.samples
    wait_for("every instance healthy again", lambda: sampler.healthy() == INSTANCES, 60, 0.2)
    states = json.loads(fleetctl(lab, "list-units", "-o", "json").stdout)
    assert {u["hash"] for u in states if "api@" in u["name"]} == good
    fleetctl(lab, "destroy", *(f"api@{i}.service" for i in range(1, INSTANCES + 1)))


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
