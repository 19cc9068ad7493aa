"""Issue 14, the dashboard end to end: headless Chromium (Debian's, driven by Playwright) against a
real three-node lab. A unit started with fleetctl appears as running without a reload, and when
its node is killed the page shows it moved. A screenshot is saved as a test artifact."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from fleetpy.cli.fleetctl import cli
from fleetpy.lab.lab import Lab

pytestmark = pytest.mark.integration

AGENT_TTL = 3.0
CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(
    os.environ.get("FLEETPY_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts")
)
APP = "[Unit]\nDescription=app\n[Service]\nExecStart=/bin/sleep 100000\n[X-Fleet]\nMachineMetadata=role=app\n"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(Path(tmp_path_factory.mktemp("uilab", numbered=True)))
    metadata = {"node1": {"role": "ui"}, "node2": {"role": "app"}, "node3": {"role": "app"}}
    lab.up(
        node_count=3, network="loopback", agent_ttl=f"{AGENT_TTL:.0f}s", metadata=metadata, containers=False
    )
    try:
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def ui_endpoint(lab) -> str:
    """node1's API on TCP, from its machine record (read before Playwright runs its own loop)."""
    node1 = next(n for n in lab.state.nodes if n.name == "node1")
    machines = lab.read(lambda registry: registry.machines())
    return next(m.api_endpoint for m in machines if m.id == node1.machine_id)


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (scripts/setup --test)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


def test_a_started_unit_shows_running_live_and_a_killed_nodes_unit_shows_moved(
    lab, ui_endpoint, browser, tmp_path, monkeypatch
):
    endpoint = ui_endpoint
    token = Path(lab.state.token_file).read_text().strip()
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    page.goto(f"{endpoint}/ui/login")
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")
    page.wait_for_url(f"{endpoint}/ui")
    page.wait_for_selector("#live:has-text('live')")  # the stream is open
    page.evaluate("window.notReloaded = true")

    monkeypatch.chdir(tmp_path)
    (tmp_path / "app.service").write_text(APP)
    result = CliRunner().invoke(cli, ["--endpoint", lab.endpoint(), "start", "app.service"])
    assert result.exit_code == 0, result.output
    row = 'tr[data-unit="app.service"]'
    page.wait_for_selector(f"{row}.healthy td.active:has-text('active')", timeout=15_000)
    assert page.evaluate("window.notReloaded") is True
    first = page.inner_text(f"{row} td:nth-child(2)")
    victim = next(n.name for n in lab.state.nodes if n.machine_id.startswith(first))
    assert victim in ("node2", "node3")

    # The lab is this module's alone and goes down after it: the node stays dead.
    lab.kill_node(victim)
    page.wait_for_function(
        """([row, first]) => {
            const cells = document.querySelectorAll(`${row} td`);
            return cells.length && cells[1].textContent !== first && cells[3].textContent === "active";
        }""",
        arg=[row, first],
        timeout=int((3 * AGENT_TTL + 20) * 1000),
    )
    page.wait_for_selector("#events td:has-text('UnitMoved')", timeout=5_000)
    assert page.evaluate("window.notReloaded") is True
    moved = page.inner_text("#events tbody")
    assert f"app.service moved from {first}" in moved
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    page.click(f"{row} a")
    page.wait_for_selector("#explain")
    assert "app.service ->" in page.inner_text("#explain")
    assert "excluded" in page.inner_text("#explain")  # node1 (role=ui) is never a candidate
    page.screenshot(path=str(ARTIFACTS / "dashboard-unit.png"), full_page=True)
