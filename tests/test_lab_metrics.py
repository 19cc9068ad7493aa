"""Issue 14: the lab serves every node's metrics in one Prometheus scrape on 127.0.0.1, behind the
lab's token, from `fleetpy lab up --metrics` until `fleetpy lab down` (a real lab: etcd, systemd
managers, fleetds)."""

from __future__ import annotations

import json

import httpx
import pytest
import yaml
from click.testing import CliRunner
from labtools import short_lab_dir
from prometheus_client.parser import text_string_to_metric_families

from fleetpy.cli.fleetpy import main as fleetpy_cli
from fleetpy.lab import node as nodes
from fleetpy.lab.lab import Lab

pytestmark = pytest.mark.integration


def lab_cli(*args: str) -> str:
    result = CliRunner().invoke(fleetpy_cli, ["lab", *args])
    assert result.exit_code == 0, result.output
    return result.output


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_lab_up_metrics_serves_every_nodes_metrics_behind_the_token_until_down():
    with short_lab_dir("obsm") as directory:
        where = ["--dir", str(directory)]
        out = lab_cli("up", *where, "--nodes", "2", "--network", "loopback", "--no-containers", "--metrics")
        url = json.loads(lab_cli("status", *where, "--json"))["metrics"]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        assert f"metrics  {url}" in out and f"metrics  {url}" in lab_cli("status", *where)
        # lab status speaks -o as fleetctl does: yaml, and wide with the machine ids unabridged
        assert yaml.safe_load(lab_cli("status", *where, "-o", "yaml"))["metrics"] == url
        wide = lab_cli("status", *where, "-o", "wide")
        assert all(n.machine_id in wide for n in Lab(directory).state.nodes)
        token = (directory / "token").read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}

        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        answer = httpx.get(url, headers=auth, timeout=30)
        assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/plain")
        found = samples(answer.text)
        for node in ("node1", "node2"):
            assert found[("fleetpy_scrape_up", (("node", node),))] == 1
            assert found[("fleetpy_machines", (("node", node),))] == 2
            joined = (("call", "register_machine"), ("node", node), ("operation", "put"))
            assert found[("fleetpy_etcd_request_seconds_count", joined)] >= 1

        # A dead node is reported down; the other goes on being scraped.
        lab_cli("kill-node", *where, "node2")
        found = samples(httpx.get(url, headers=auth, timeout=30).text)
        assert found[("fleetpy_scrape_up", (("node", "node2"),))] == 0
        assert found[("fleetpy_scrape_up", (("node", "node1"),))] == 1
        assert not any(
            dict(labels).get("node") == "node2" for name, labels in found if name != "fleetpy_scrape_up"
        )

        # A server that died is started again, on the same URL, by the next `up` (with node2).
        cgroup = Lab(directory).state.metrics_cgroup
        nodes.kill_cgroup(cgroup)
        with pytest.raises(httpx.ConnectError):
            httpx.get(url, headers=auth)
        lab_cli("up", *where, "--nodes", "2", "--network", "loopback", "--no-containers")
        assert json.loads(lab_cli("status", *where, "--json"))["metrics"] == url
        found = samples(httpx.get(url, headers=auth, timeout=30).text)
        assert found[("fleetpy_scrape_up", (("node", "node2"),))] == 1

        cgroup = Lab(directory).state.metrics_cgroup
        lab_cli("down", *where)
        with pytest.raises(httpx.ConnectError):
            httpx.get(url, headers=auth)
        assert not (nodes.CGROUP_ROOT / "unified" / cgroup).exists()
        assert Lab(directory).state is None
