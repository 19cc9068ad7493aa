"""The lab's metrics: every node's /metrics in one Prometheus text, each sample labelled by node.

`fleetpy lab metrics` prints it once; `fleetpy lab up --metrics` also serves it on 127.0.0.1 for
Prometheus (or curl) to scrape, behind the lab's API token, from a process of its own that the
state file records (a cgroup, as for etcd) so that `lab down` stops it: metrics_server.py.
"""

from __future__ import annotations

import concurrent.futures
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from fleetpy.lab import node as nodes
from fleetpy.lab import processes
from fleetpy.lab.state import LabError, State, StateFile

SCRAPE_TIMEOUT = 5.0
SERVER_START_TIMEOUT = 10.0
MAX_PARALLEL_SCRAPES = 16


def scrape(book: StateFile, timeout: float = SCRAPE_TIMEOUT) -> str:
    """Scrape each node's fleetd over its unix socket (in parallel), as Prometheus would over TCP.

    A node that does not answer gets `fleetpy_scrape_up{node=...} 0` instead of its metrics.
    """
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.parser import text_string_to_metric_families

    names = [n.name for n in book.state.nodes] if book.state else []
    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(names), MAX_PARALLEL_SCRAPES))) as pool:
        texts = list(pool.map(lambda name: _node_metrics(book.dir / name / "fleet.sock", timeout), names))
    families: dict[str, Any] = {}
    up = GaugeMetricFamily("fleetpy_scrape_up", "1 if the node's fleetd answered the scrape", labels=["node"])
    for name, text in zip(names, texts, strict=True):
        up.add_metric([name], 0 if text is None else 1)
        for family in text_string_to_metric_families(text or ""):
            merged = families.setdefault(
                family.name, family.__class__(family.name, family.documentation, family.type)
            )
            for sample in family.samples:
                merged.add_sample(sample.name, {"node": name, **sample.labels}, sample.value)

    class Merged:
        def collect(self) -> list[Any]:
            return [up, *families.values()]

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry).decode()


def _node_metrics(socket_path: Path, timeout: float) -> str | None:
    import httpx

    # Plain HTTP over a unix socket: verify=False spares loading the CA bundle (0.2 s a client).
    transport = httpx.HTTPTransport(uds=str(socket_path), verify=False)
    try:
        with httpx.Client(transport=transport, timeout=timeout) as http:
            answer = http.get("http://fleetd/metrics")
            answer.raise_for_status()
            return answer.text
    except (httpx.HTTPError, OSError):
        return None


# -- serving it ----------------------------------------------------------------------------------


def server_alive(state: State) -> bool:
    return bool(state.metrics_cgroup) and processes.cgroup_alive(state.metrics_cgroup)


def start_server(book: StateFile, port: int = 0) -> str:
    """Serve the lab's metrics at http://127.0.0.1:PORT/metrics (PORT 0: a free one, or the one
    it had before); returns that URL. A server that runs already is kept."""
    state = book.require()
    if server_alive(state):
        return state.metrics_url
    if state.metrics_cgroup:
        nodes.kill_cgroup(state.metrics_cgroup, what="the lab's metrics server")
    if not port and state.metrics_url:
        port = int(state.metrics_url.rsplit(":", 1)[1].split("/")[0])
    listener = socket.socket()
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("127.0.0.1", port))
        except OSError as error:
            raise LabError(f"cannot serve the lab's metrics on 127.0.0.1:{port}: {error}") from None
        listener.listen(64)  # scrapes queue here until the server has started
        state.metrics_url = f"http://127.0.0.1:{listener.getsockname()[1]}/metrics"
        state.metrics_cgroup = f"fleetpy-lab-metrics-{secrets.token_hex(4)}.slice"
        book.save()  # recorded before it exists
        argv = [
            *nodes.make_cgroup(state.metrics_cgroup),
            *(sys.executable, "-m", "fleetpy.lab.metrics_server", "--dir", str(book.dir)),
            *("--fd", str(listener.fileno())),
        ]
        with open(book.dir / "metrics.log", "ab") as log:
            subprocess.Popen(
                argv,
                pass_fds=[listener.fileno()],
                env={**os.environ, "PYTHONPATH": processes.pythonpath()},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
    finally:
        listener.close()
    _wait_serving(book, state)
    return state.metrics_url


def _wait_serving(book: StateFile, state: State, timeout: float = SERVER_START_TIMEOUT) -> None:
    """Until the server answers (a scrape without the token: refused); its socket already listens."""
    import http.client

    address = state.metrics_url.removeprefix("http://").removesuffix("/metrics")
    connection = http.client.HTTPConnection(address, timeout=timeout)
    try:
        connection.request("GET", "/metrics")
        connection.getresponse().read()
    except OSError as error:
        log = (book.dir / "metrics.log").read_text(errors="replace")[-2000:]
        raise LabError(f"the lab's metrics server did not answer on {address}: {error}\n{log}") from None
    finally:
        connection.close()


def stop_server(state: State) -> None:
    if state.metrics_cgroup:
        nodes.kill_cgroup(state.metrics_cgroup, what="the lab's metrics server")
