"""What fleetpy accepts is what a real systemd runs: the same values, no smuggled directives.

Each unit goes through the door (`UnitFile.from_options` or `UnitFile.parse`), out as the
canonical text the agent writes, and into a real systemd --user manager; `systemctl show`
must then report exactly the values fleetpy stored.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetpy.lab.node import Node
from fleetpy.systemd import DbusManager
from fleetpy.unit import UnitError, UnitFile

pytest_plugins = ["fixtures_nodes"]
pytestmark = pytest.mark.integration


def described(description: str, exec_start: str = "/bin/true") -> list[dict]:
    return [
        {"section": "Unit", "name": "Description", "value": description},
        {"section": "Service", "name": "ExecStart", "value": exec_start},
    ]


ACCEPTED = {
    # Go fleetctl's form of a continued line, with a comment inside the continuation
    "continued.service": described("first \\\n# a comment\n   second"),
    "tabs.service": described("a\tb \t"),
    "escaped.service": described("ends in two\\\\"),
    "comment-trap.service": UnitFile.parse(
        "[Unit]\n# was commented out in fleet \\\nDescription=live now\n[Service]\nExecStart=/bin/true\n"
    ),
    "exec.service": described("x", "/bin/sleep \\\n  1000"),
}


def show(node: Node, name: str, prop: str) -> str:
    result = node.run(["systemctl", "--user", "show", "-p", prop, "--value", "--", name], check=True)
    return result.stdout.removesuffix("\n")


async def test_accepted_units_read_the_same_in_systemd(systemd_node: Node) -> None:
    manager = await DbusManager.connect(
        systemd_node.env["DBUS_SESSION_BUS_ADDRESS"], systemd_node.dir / "units"
    )
    try:
        files = {
            name: spec if isinstance(spec, UnitFile) else UnitFile.from_options(spec)
            for name, spec in ACCEPTED.items()
        }
        for name, unit_file in files.items():
            await manager.write_unit(name, unit_file.to_text())
        await manager.link(list(files))
        for name, unit_file in files.items():
            assert show(systemd_node, name, "LoadState") == "loaded", name
            assert show(systemd_node, name, "Description") == unit_file.values("Unit", "Description")[0]
            assert show(systemd_node, name, "ExecStartPre") == "", name
    finally:
        await manager.close()
    assert files["continued.service"].values("Unit", "Description") == ["first     second"]
    assert files["comment-trap.service"].values("Unit", "Description") == ["live now"]
    argv = show(systemd_node, "exec.service", "ExecStart")
    assert "argv[]=/bin/sleep 1000 ;" in argv


@pytest.mark.parametrize("name", ["a..service", "foo\\x2dbar.service", "a@b@c.service", "..service"])
async def test_names_systemd_accepts_run_through_the_manager_inside_its_unit_dir(
    systemd_node: Node, name: str
) -> None:
    manager = await DbusManager.connect(
        systemd_node.env["DBUS_SESSION_BUS_ADDRESS"], systemd_node.dir / "units"
    )
    states: list[tuple[str, str]] = []
    manager.on_state_change(lambda unit, load, active, sub: states.append((unit, active)))
    try:
        assert await manager.write_unit(name, "[Service]\nExecStart=/bin/sleep 1000\n")
        assert [p.name for p in manager.unit_dir.iterdir()] == [name]
        await manager.link([name])
        assert await manager.start(name) == "done"
        assert (await manager.unit_state(name))[1] == "active"
        assert await manager.installed_units() == {name: "[Service]\nExecStart=/bin/sleep 1000\n"}
        # The D-Bus object path escapes "\\" and "@" ("_5c", "_40"); signals map back to the name.
        for _ in range(100):
            if (name, "active") in states:
                break
            await asyncio.sleep(0.02)
        assert (name, "active") in states
        assert await manager.stop(name) == "done"
        await manager.remove_units([name])
        assert list(manager.unit_dir.iterdir()) == []
    finally:
        await manager.close()


DESCRIPTIONS = st.text(
    st.one_of(
        st.sampled_from("\\\n\r\t \x00\x0b\x85\u2028#;[]=\"'@"),
        st.characters(blacklist_categories=("Cs",), blacklist_characters="%"),  # % is a specifier
    ),
    max_size=20,
)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(DESCRIPTIONS, min_size=12, max_size=12))
def test_systemd_reads_every_accepted_value_as_fleetpy_stored_it(
    systemd_node: Node, values: list[str]
) -> None:
    unit_dir = systemd_node.dir / "units"
    unit_dir.mkdir(exist_ok=True)
    accepted: dict[str, UnitFile] = {}
    for value in values:
        try:
            unit_file = UnitFile.from_options(described(value))
        except UnitError:
            continue
        name = f"p-{unit_file.hash[:12]}.service"
        (unit_dir / name).write_text(unit_file.to_text())
        accepted[name] = unit_file
    if not accepted:
        return
    systemd_node.run(
        ["systemctl", "--user", "link", "--runtime", *(str(unit_dir / n) for n in accepted)], check=True
    )
    systemd_node.run(["systemctl", "--user", "daemon-reload"], check=True)
    for name, unit_file in accepted.items():
        assert show(systemd_node, name, "LoadState") == "loaded", unit_file.to_text()
        # systemd shows the unit's name for an empty Description
        expected = unit_file.values("Unit", "Description")[0] or name
        assert show(systemd_node, name, "Description") == expected
        assert show(systemd_node, name, "ExecStartPre") == ""
