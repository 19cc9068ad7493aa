"""Container units: generated text, quoting against injection, the units/ library, and a real podman run."""

from __future__ import annotations

import shlex
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from fleetpy.containers.cli import new_unit_command
from fleetpy.containers.generate import (
    InvalidEnv,
    InvalidImage,
    InvalidPort,
    InvalidValue,
    InvalidVolume,
    generate_unit,
)
from fleetpy.lab.image import build_busybox_image, prepare_node, write_podman_config
from fleetpy.lab.node import Node
from fleetpy.unit import UnitError, UnitFile, load_unit

pytest_plugins = ["fixtures_nodes"]

IMAGE = "localhost/fleetpy-busybox"
HOSTILE = [
    "A=x; rm -rf /",
    "B=$(touch /tmp/pwned)",
    "C=`id`",
    "D=%n %i %%",
    'E=" ; /bin/false "',
    "F=a\\b",
    "G=${HOME}",
    "H=;",
]


def _split_exec(value: str) -> list[str]:
    """Undo what the generator did, the way systemd reads a command line (quotes, $$, %%)."""
    words = shlex.split(value, posix=True)
    return [w.replace("$$", "$").replace("%%", "%") for w in words]


def test_podman_template_unit() -> None:
    text = generate_unit(
        "web@.service", IMAGE, ports=["8080:80"], conflicts=["web@*.service"], metadata=["role=web"]
    )
    unit = load_unit("web@1.service", text)
    service = {o.name: o.value for o in unit.file.options if o.section == "Service"}
    assert service["Type"] == "notify" and service["NotifyAccess"] == "all"
    assert service["KillMode"] == "mixed" and service["SuccessExitStatus"] == "137 143"
    assert service["Restart"] == "always" and service["TimeoutStartSec"] == "300"
    start = service["ExecStart"]
    assert start.startswith("/usr/bin/podman run --rm --name=%p-%i --pull=never --sdnotify=conmon")
    assert "--cgroups=disabled --init" in start and "-p 8080:80" in start
    assert service["ExecStop"] == "/usr/bin/podman stop -t 10 --ignore %p-%i"
    # A local image is never pulled: the lab has no registry.
    assert unit.file.values("Service", "ExecStartPre") == ["-/usr/bin/podman rm -f --ignore %p-%i"]
    assert unit.fleet.conflicts == ("web@*.service",)
    assert unit.fleet.metadata_matches({"role": "web"})


def test_a_fleet_volume_is_asked_for_in_x_fleet_and_bound_from_the_path_fleetd_hands_over() -> None:
    text = generate_unit(
        "db@.service", IMAGE, volumes=["pg-%i:shared:/var/lib/db:ro", "logs:/l$x%n", "/etc/hosts:/etc/hosts"]
    )
    unit = load_unit("db@7.service", text)
    assert (unit.fleet.shared_volumes, unit.fleet.volumes) == (("pg-7",), ("logs",))
    words = _split_exec(unit.file.values("Service", "ExecStart")[0])
    mounts = [words[i + 1] for i, word in enumerate(words) if word == "-v"]
    # What systemd makes of it for instance 7: its variable for pg-7; other "$" and "%" literal.
    assert [m.replace("%i", "7") for m in mounts] == [
        "${FLEET_VOLUME_pg_7}:/var/lib/db:ro",
        "${FLEET_VOLUME_logs}:/l$x%n",
        "/etc/hosts:/etc/hosts",
    ]
    with pytest.raises(InvalidVolume, match="unknown volume driver 'nfs'; write Volume=pg for a local"):
        generate_unit("db.service", IMAGE, volumes=["pg:nfs:/data"])


def test_docker_non_template_unit() -> None:
    text = generate_unit(
        "es.service", "docker.io/library/elasticsearch:7.17.18", runtime="docker", is_global=True
    )
    unit = load_unit("es.service", text)
    assert unit.file.values("Unit", "After") == ["docker.service"]
    assert unit.file.values("Unit", "Requires") == ["docker.service"]
    assert unit.file.values("Service", "Type") == ["simple"]
    assert "-/usr/bin/docker pull docker.io/library/elasticsearch:7.17.18" in unit.file.values(
        "Service", "ExecStartPre"
    )
    assert unit.file.values("Service", "ExecStart")[0].startswith("/usr/bin/docker run --rm --name=%p ")
    assert unit.fleet.is_global


def test_remote_podman_image_is_pulled_before_the_run() -> None:
    text = generate_unit("app.service", "quay.io/org/app:1.2@sha256:" + "a" * 64)
    pre = UnitFile.parse(text).values("Service", "ExecStartPre")
    assert pre[-1] == "-/usr/bin/podman pull quay.io/org/app:1.2@sha256:" + "a" * 64


def test_hostile_values_stay_single_arguments() -> None:
    command = ["sh", "-c", 'echo "$A" > /x; exec httpd', "%n", "$(reboot)"]
    text = generate_unit("web@.service", IMAGE, env=HOSTILE, command=command)
    unit = load_unit("web@2.service", text)
    (start,) = unit.file.values("Service", "ExecStart")
    words = _split_exec(start)
    env_values = [words[i + 1] for i, w in enumerate(words) if w == "-e"]
    assert env_values == HOSTILE
    assert words[-len(command) :] == command
    assert "$(" not in start.replace("$$(", "")
    assert "%n" not in start.replace("%%n", "")


@pytest.mark.parametrize("value", ["A=x\nExecStartPre=/bin/rm -rf /", "A=x\r", "A=\x00"])
def test_line_breaks_and_control_characters_are_refused(value: str) -> None:
    with pytest.raises(InvalidValue, match="not allowed"):
        generate_unit("web.service", IMAGE, env=[value])


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"image": "Bad Image"}, InvalidImage),
        ({"image": "library/UPPER"}, InvalidImage),
        ({"image": "busybox;rm"}, InvalidImage),
        ({"ports": ["80:99999"]}, InvalidPort),
        ({"ports": ["http"]}, InvalidPort),
        ({"env": ["1A=b"]}, InvalidEnv),
        ({"env": ["NOEQUALS"]}, InvalidEnv),
        ({"volumes": ["data/x:/data"]}, InvalidVolume),
        ({"volumes": ["pg:nfs:/data"]}, InvalidVolume),
        ({"volumes": ["pg:shared:rel"]}, InvalidVolume),
        ({"volumes": ["pg:/data:bogus"]}, InvalidVolume),
        ({"volumes": ["/data:rel"]}, InvalidVolume),
        ({"volumes": ["/a:/b:bogus"]}, InvalidVolume),
        ({"runtime": "lxc"}, InvalidValue),
        ({"restart": "sometimes"}, InvalidValue),
        ({"metadata": ["role web"]}, InvalidValue),
        ({"conflicts": ["a b.service"]}, InvalidValue),
        ({"description": "x\ny"}, InvalidValue),
        ({"containers_conf": "relative.conf"}, InvalidValue),
    ],
)
def test_bad_values_get_a_clear_error(kwargs: dict, error: type[Exception]) -> None:
    args = {"name": "web.service", "image": IMAGE, **kwargs}
    with pytest.raises(error):
        generate_unit(**args)


def test_contradicting_fleet_options_fail_at_generation() -> None:
    with pytest.raises(UnitError, match="Global"):
        generate_unit("web.service", IMAGE, is_global=True, machine_of="db.service")


def test_containers_conf_becomes_unit_environment() -> None:
    text = generate_unit("web.service", IMAGE, containers_conf="/etc/fleetpy/containers.conf")
    assert UnitFile.parse(text).values("Service", "Environment") == [
        "CONTAINERS_CONF=/etc/fleetpy/containers.conf"
    ]


def test_sidekick_style_machine_of_expands_per_instance() -> None:
    text = generate_unit("log@.service", IMAGE, machine_of="web@%i.service")
    assert load_unit("log@3.service", text).fleet.machine_of == ("web@3.service",)


def test_cli_writes_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "web@.service"
    args = ["web@.service", "--image", IMAGE, "--command", "httpd -f -p 8080", "-o", str(out)]
    runner = CliRunner()
    first = runner.invoke(new_unit_command, args)
    assert first.exit_code == 0, first.output
    assert (
        load_unit("web@1.service", out.read_text())
        .file.values("Service", "ExecStart")[0]
        .endswith("httpd -f -p 8080")
    )
    again = runner.invoke(new_unit_command, args)
    assert again.exit_code == 1 and "--force" in again.output
    assert runner.invoke(new_unit_command, [*args, "--force"]).exit_code == 0
    bad = runner.invoke(new_unit_command, ["web.service", "--image", IMAGE, "--port", "x", "-o", str(out)])
    assert bad.exit_code == 1 and "port 'x'" in bad.output


# --- real podman inside a lab node -------------------------------------------------------------


@pytest.fixture(scope="session")
def podman_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = write_podman_config(tmp_path_factory.mktemp("podman"))
    build_busybox_image(IMAGE, env)
    # Idempotent: a second call finds the image.
    build_busybox_image(IMAGE, env)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, deadline: float) -> str:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return response.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _podman_names(node: Node, env: dict[str, str]) -> list[str]:
    result = node.run(["podman", "ps", "-a", "--format", "{{.Names}}"], env_extra=env, check=True)
    return result.stdout.split()


@pytest.mark.integration
def test_web_unit_runs_in_a_node(node_factory: Callable[..., Node], podman_env: dict[str, str]) -> None:
    node = node_factory("ct")
    prepare_node(node, podman_env)
    port = _free_port()
    text = generate_unit(
        "web@.service",
        IMAGE,
        network="host",
        env=["PAGE=hello $(id); %n `x`"],
        command=["sh", "-c", f'echo "$PAGE" > /www/index.html && exec httpd -f -p {port} -h /www'],
    )
    unit_dir = node.dir / "home" / ".config" / "systemd" / "user"
    unit_dir.mkdir(parents=True)
    (unit_dir / "web@.service").write_text(text)
    node.run(["systemctl", "--user", "daemon-reload"], check=True)

    started = time.monotonic()
    result = node.run(["systemctl", "--user", "start", "web@1.service"])
    latency = time.monotonic() - started
    assert result.returncode == 0, (
        result.stderr + node.run(["systemctl", "--user", "status", "web@1.service"]).stdout
    )
    try:
        # The value reached the container verbatim: systemd and podman ran nothing of it.
        assert _get(f"http://127.0.0.1:{port}/", time.monotonic() + 10) == "hello $(id); %n `x`\n"
        assert _podman_names(node, podman_env) == ["web-1"]
    finally:
        node.run(["systemctl", "--user", "stop", "web@1.service"], check=True)
    state = node.run(["systemctl", "--user", "show", "-p", "ActiveState,Result", "web@1.service"]).stdout
    assert "ActiveState=inactive" in state and "Result=success" in state
    assert _podman_names(node, podman_env) == []
    print(f"web@1.service start latency: {latency * 1000:.0f} ms")
    assert latency < 10
