"""Generate systemd units that run one container in the foreground, for podman or docker.

Every user value is validated, then quoted with systemd's own rules: systemd
splits ExecStart= itself (no shell ever sees it), so quoting must defeat its
word splitting, its `;` command separator, `$VAR` expansion and `%` specifiers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache

import jinja2

from fleetpy.unit import UnitError, UnitName, load_unit, validate_unit_name
from fleetpy.unit.errors import InvalidFleetOptions
from fleetpy.unit.fleet import check_volume_name, split_volume, volume_environment_name
from fleetpy.unit.quoting import escape_specifiers, quote_value, quote_word

RUNTIMES = {"podman": "/usr/bin/podman", "docker": "/usr/bin/docker"}
RESTART_POLICIES = ("no", "always", "on-success", "on-failure", "on-abnormal", "on-abort", "on-watchdog")
NETWORKS = ("host", "none", "bridge")
# Exit statuses of a container stopped by SIGKILL (128+9) or SIGTERM (128+15): a clean stop, not a failure.
SUCCESS_EXIT_STATUS = "137 143"
# Images a registry-less lab keeps locally: never pull them.
LOCAL_PREFIX = "localhost/"
# Settings this host's rootful podman needs (HOST-NOTES): default ulimits exceed
# the hard limits; --cgroups=disabled keeps the container in the unit's own
# cgroup so systemd (and a lab node kill) reaches it; --init reaps and forwards signals.
PODMAN_RUN_FLAGS = (
    "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096", "--cgroups=disabled", "--init",
)  # fmt: skip

# Characters that never need quoting in an ExecStart= word.
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A simplified distribution/reference grammar: [host[:port]/]path[:tag][@digest].
_IMAGE = re.compile(
    r"(?:(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]{1,5})?)/)?"
    r"(?P<path>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[a-f0-9]{64}))?"
)
_PORT = re.compile(
    r"(?:(?P<ip>[0-9.]+|\[[0-9a-fA-F:]+\]):)?(?:(?P<host>[0-9]{1,5})?:)?(?P<container>[0-9]{1,5})(?:/(?P<proto>tcp|udp|sctp))?"
)
_VOLUME_OPTIONS = frozenset(
    {"ro", "rw", "z", "Z", "U", "O", "shared", "rshared", "slave", "rslave", "private", "rprivate", "nocopy"}
)
_META_KEY = re.compile(r"[A-Za-z0-9_.-]+")
_META_VALUE = re.compile(r"[A-Za-z0-9_.:/@+-]+")
_GLOB = re.compile(r"[A-Za-z0-9:_.@*?\[\]-]+(?:\.(?:service|socket|timer|path|target|mount|device))?")


class ContainerUnitError(ValueError):
    """A generator argument that would make a wrong or unsafe unit; the message says which and why."""


class InvalidImage(ContainerUnitError):
    """Not an image reference podman or docker would accept."""


class InvalidPort(ContainerUnitError):
    """Not a [ip:][hostPort:]containerPort[/proto] port mapping."""


class InvalidEnv(ContainerUnitError):
    """Not a KEY=VALUE container environment entry."""


class InvalidVolume(ContainerUnitError):
    """Not an absolute SRC:DST[:OPTIONS] bind mount."""


class InvalidValue(ContainerUnitError):
    """Any other unusable value: line breaks, control characters, unknown choices."""


@dataclass(frozen=True)
class _Rendered:
    """What the template lays out; every string in here is already quoted for systemd."""

    description: str
    runtime: str
    unit_deps: tuple[str, ...]
    environment: tuple[str, ...]
    pre: tuple[str, ...]
    start: str
    stop: str
    post: tuple[str, ...]
    unit_type: str
    notify_all: bool
    restart: str
    success_exit_status: str
    start_timeout: int
    stop_timeout: int
    fleet: tuple[tuple[str, str], ...]


def systemd_quote(value: str, expand_dollar: bool = True) -> str:
    """One word of the unit's command lines, read back verbatim (fleetpy.unit.quoting's rule);
    control characters are refused first, with the container unit's own error."""
    _check_text("value", value)
    return quote_word(value, expand_dollar)


def generate_unit(
    name: str,
    image: str,
    runtime: str = "podman",
    ports: Sequence[str] = (),
    env: Sequence[str] = (),
    volumes: Sequence[str] = (),
    conflicts: Sequence[str] = (),
    metadata: Sequence[str] = (),
    is_global: bool = False,
    machine_of: str | None = None,
    command: Sequence[str] = (),
    restart: str = "always",
    network: str | None = None,
    description: str | None = None,
    containers_conf: str | None = None,
    storage_conf: str | None = None,
    start_timeout: int = 300,
    stop_timeout: int = 10,
) -> str:
    """Return the text of a unit running `image` in the foreground, named after the unit.

    Raises a ContainerUnitError subclass for a bad argument, or a UnitError
    when the [X-Fleet] options contradict each other (e.g. Global with MachineOf).
    """
    unit_name = _check_choices(name, image, runtime, restart, network, start_timeout, stop_timeout)
    # The container is named after the unit, so ExecStop and the cleanup find it.
    container = "%p-%i" if unit_name.is_template or unit_name.is_instance else "%p"
    if runtime == "podman":
        life = _podman(container, image, stop_timeout, containers_conf, storage_conf)
    else:
        if containers_conf or storage_conf:
            raise InvalidValue(
                "--containers-conf and --storage-conf are podman settings; drop them for docker"
            )
        life = _docker(container, image, stop_timeout)
    run = [*life.run]
    if network:
        run.append(f"--network={network}")
    run += [a for port in ports for a in ("-p", systemd_quote(_check_port(port)))]
    run += [a for item in env for a in ("-e", systemd_quote(_check_env(item)))]
    mounts = [_volume_mount(volume) for volume in volumes]
    run += [a for mount, _ in mounts for a in ("-v", mount)]
    run.append(systemd_quote(image))
    run += [systemd_quote(arg) for arg in command]

    rendered = _Rendered(
        description=_description(description or f"{image} in a {runtime} container"),
        runtime=runtime,
        unit_deps=life.unit_deps,
        environment=life.environment,
        pre=life.pre,
        start=" ".join(run),
        stop=life.stop,
        post=life.post,
        unit_type=life.unit_type,
        notify_all=life.notify_all,
        restart=restart,
        success_exit_status=SUCCESS_EXIT_STATUS,
        start_timeout=start_timeout,
        stop_timeout=stop_timeout + 5,
        fleet=(
            *_fleet_options(conflicts, metadata, is_global, machine_of),
            *(("Volume", word) for _, word in mounts if word),
        ),
    )
    text = _template().render(unit=rendered)
    # The last word on [X-Fleet]: its own parser, so contradictions fail here, not at scheduling time.
    load_unit(name, text)
    return text


@dataclass(frozen=True)
class _Lifecycle:
    """How one runtime starts, stops and cleans up a container named after its unit."""

    run: tuple[str, ...]  # the start of ExecStart, up to the per-container options
    pre: tuple[str, ...]
    stop: str
    post: tuple[str, ...]
    unit_type: str
    notify_all: bool
    environment: tuple[str, ...] = ()
    unit_deps: tuple[str, ...] = ()


def _podman(
    container: str, image: str, stop_timeout: int, containers_conf: str | None, storage_conf: str | None
) -> _Lifecycle:
    binary = RUNTIMES["podman"]
    pre = [f"-{binary} rm -f --ignore {container}"]
    if not image.startswith(LOCAL_PREFIX):
        pre.append(f"-{binary} pull {systemd_quote(image)}")
    environment = []
    for var, path in (("CONTAINERS_CONF", containers_conf), ("CONTAINERS_STORAGE_CONF", storage_conf)):
        if path is not None:
            _check_absolute(var, path)
            environment.append(systemd_quote(f"{var}={path}", expand_dollar=False))
    return _Lifecycle(
        # The pull, if any, happened in ExecStartPre; the run must never reach for the network.
        run=(
            binary,
            "run",
            "--rm",
            f"--name={container}",
            "--pull=never",
            "--sdnotify=conmon",
            *PODMAN_RUN_FLAGS,
        ),
        pre=tuple(pre),
        stop=f"{binary} stop -t {stop_timeout} --ignore {container}",
        post=(f"-{binary} rm -f --ignore {container}",),
        unit_type="notify",
        notify_all=True,
        environment=tuple(environment),
    )


def _docker(container: str, image: str, stop_timeout: int) -> _Lifecycle:
    binary = RUNTIMES["docker"]
    pre = [f"-{binary} kill {container}", f"-{binary} rm {container}"]
    if not image.startswith(LOCAL_PREFIX):
        pre.append(f"-{binary} pull {systemd_quote(image)}")
    return _Lifecycle(
        run=(binary, "run", "--rm", f"--name={container}"),
        pre=tuple(pre),
        stop=f"{binary} stop -t {stop_timeout} {container}",
        post=(f"-{binary} rm -f {container}",),
        # The docker client stays in the foreground and exits with the container.
        unit_type="simple",
        notify_all=False,
        unit_deps=("After=docker.service", "Requires=docker.service"),
    )


def _check_choices(
    name: str,
    image: str,
    runtime: str,
    restart: str,
    network: str | None,
    start_timeout: int,
    stop_timeout: int,
) -> UnitName:
    try:
        unit_name = validate_unit_name(name)
    except UnitError as err:
        raise InvalidValue(str(err)) from err
    if unit_name.suffix != "service":
        raise InvalidValue(f"{name}: a container unit must be a .service")
    if runtime not in RUNTIMES:
        raise InvalidValue(f"runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if restart not in RESTART_POLICIES:
        raise InvalidValue(f"restart {restart!r}: choose one of {', '.join(RESTART_POLICIES)}")
    if network is not None and network not in NETWORKS:
        raise InvalidValue(f"network {network!r}: choose one of {', '.join(NETWORKS)}")
    for label, seconds in (("start timeout", start_timeout), ("stop timeout", stop_timeout)):
        if not isinstance(seconds, int) or seconds <= 0:
            raise InvalidValue(f"{label} {seconds!r}: give a positive number of seconds")
    _check_image(image)
    return unit_name


@cache
def _template() -> jinja2.Template:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("fleetpy", "templates"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        # A unit file, not HTML: values are quoted for systemd before rendering.
        autoescape=False,
    )
    return environment.get_template("container.service.j2")


def _fleet_options(
    conflicts: Iterable[str], metadata: Iterable[str], is_global: bool, machine_of: str | None
) -> list[tuple[str, str]]:
    options: list[tuple[str, str]] = []
    for pattern in conflicts:
        _check_text("conflicts", pattern)
        if not _GLOB.fullmatch(pattern.replace("%i", "").replace("%p", "")):
            raise InvalidValue(f"conflicts {pattern!r}: give a unit name or glob such as 'web@*.service'")
        options.append(("Conflicts", pattern))
    for item in metadata:
        key, eq, value = item.partition("=")
        if not eq or not _META_KEY.fullmatch(key) or not _META_VALUE.fullmatch(value):
            raise InvalidValue(f"metadata {item!r}: write key=value with no spaces or quotes, e.g. role=web")
        options.append(("MachineMetadata", f'"{key}={value}"'))
    if machine_of is not None:
        _check_text("machine-of", machine_of)
        if not _GLOB.fullmatch(machine_of.replace("%i", "x").replace("%p", "x")) or "*" in machine_of:
            raise InvalidValue(f"machine-of {machine_of!r}: give one unit name, e.g. web@%i.service")
        options.append(("MachineOf", machine_of))
    if is_global:
        options.append(("Global", "true"))
    return options


def _check_text(label: str, value: str) -> None:
    if not isinstance(value, str):
        raise InvalidValue(f"{label}: expected a string, got {type(value).__name__}")
    bad = sorted({c for c in value if ord(c) < 32 or ord(c) == 127})
    if bad:
        what = "line breaks" if {"\n", "\r"} & set(bad) else "control characters"
        raise InvalidValue(f"{label} {value!r}: {what} are not allowed in a unit file value")


def _description(text: str) -> str:
    # Description= is not split into words; only specifiers are expanded there.
    _check_text("description", text)
    return escape_specifiers(text)


def _check_image(image: str) -> None:
    _check_text("image", image)
    if not _IMAGE.fullmatch(image):
        raise InvalidImage(
            f"image {image!r} is not an image reference; write e.g. docker.io/library/nginx:1.25 "
            "or localhost/fleetpy-busybox (lowercase repository, optional :tag and @sha256:digest)"
        )


def _check_port(spec: str) -> str:
    _check_text("port", spec)
    match = _PORT.fullmatch(spec)
    ports = [match.group(g) for g in ("host", "container") if match and match.group(g)] if match else []
    if not match or any(not 1 <= int(p) <= 65535 for p in ports):
        raise InvalidPort(
            f"port {spec!r}: write [ip:]hostPort:containerPort[/tcp|udp], e.g. 8080:80, with ports 1-65535"
        )
    return spec


def _check_env(item: str) -> str:
    _check_text("env", item)
    key, eq, _value = item.partition("=")
    if not eq or not _ENV_KEY.fullmatch(key):
        raise InvalidEnv(
            f"env {item!r}: write KEY=VALUE with KEY made of letters, digits and '_', not starting with a digit"
        )
    return item


def _volume_mount(spec: str) -> tuple[str, str | None]:
    """The -v word for `spec`, and the [X-Fleet] Volume= word it needs (None for a host path).

    /SRC:/DST[:OPTIONS] binds a host path; NAME[:DRIVER]:/DST[:OPTIONS] (docker's named-volume
    form) binds the fleet volume NAME, local or shared, from the path fleetd hands the unit in
    $FLEET_VOLUME_<NAME>, and asks for it in [X-Fleet].
    """
    _check_text("volume", spec)
    parts = spec.split(":")
    fleet_word = None
    if parts[0] and not parts[0].startswith("/"):
        named = 3 if len(parts) > 2 and not parts[1].startswith("/") else 2
        fleet_word = ":".join(parts[: named - 1])
        try:
            name, _ = split_volume(fleet_word)
            check_volume_name(name.replace("%i", "1"))  # a template's, as an instance fills it
        except InvalidFleetOptions as error:
            raise InvalidVolume(f"volume {spec!r}: {error}") from None
        parts = [f"${{{volume_environment_name(name)}}}", *parts[named - 1 :]]
    if len(parts) not in (2, 3):
        raise InvalidVolume(
            f"volume {spec!r}: write SRC:DST[:OPTIONS] with absolute paths, e.g. /srv/data:/data:ro, "
            "or NAME[:DRIVER]:DST[:OPTIONS] for a fleet volume, e.g. pgdata:shared:/data"
        )
    for label, path in (("source", parts[0]), ("destination", parts[1])):
        if not path.startswith("/") and not (label == "source" and fleet_word):
            raise InvalidVolume(f"volume {spec!r}: the {label} {path!r} must be an absolute path")
    if len(parts) == 3 and not set(parts[2].split(",")) <= _VOLUME_OPTIONS:
        raise InvalidVolume(
            f"volume {spec!r}: unknown options {parts[2]!r}; use some of {', '.join(sorted(_VOLUME_OPTIONS))}"
        )
    if fleet_word is None:
        return systemd_quote(spec), None
    # systemd expands the variable (and a template's %i in its name); every other "$" and "%"
    # stays literal.
    rest = escape_specifiers(":".join(parts[1:])).replace("$", "$$")
    return quote_value(f"{parts[0]}:{rest}", specifiers=True), fleet_word


def _check_absolute(label: str, path: str) -> None:
    _check_text(label, path)
    if not path.startswith("/"):
        raise InvalidValue(f"{label} {path!r}: give an absolute path")
