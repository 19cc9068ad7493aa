"""The discovery sidekick's decisions and the lab's fleetd options, without etcd (fast).

The real thing (sidekicks announcing over etcd's v3 gateway, with TLS and a password, on a
locked lab etcd) runs in tests/test_containers_lab.py and tests/test_lab_etcd.py.
"""

from __future__ import annotations

import base64
from pathlib import Path

from fleetpy.containers.discovery import Announcer, Etcd, EtcdError, _range_end
from fleetpy.lab import etcd_access
from fleetpy.lab.processes import fleetd_argv
from fleetpy.lab.state import NodeState, State, StateFile


class FakeEtcd:
    """Leases that live until `expire()`; records what was written."""

    def __init__(self) -> None:
        self.alive: set[str] = set()
        self.puts: list[tuple[str, str, str | None]] = []
        self.granted = 0

    def grant(self, ttl: int) -> str:
        self.granted += 1
        lease = f"lease{self.granted}"
        self.alive.add(lease)
        return lease

    def keepalive(self, lease: str) -> bool:
        return lease in self.alive

    def put(self, key: str, value: str, lease: str | None = None) -> None:
        self.puts.append((key, value, lease))

    def expire(self) -> None:
        self.alive.clear()


def test_each_round_keeps_one_lease_alive_and_writes_the_key_on_it() -> None:
    etcd = FakeEtcd()
    announcer = Announcer(etcd, "/services/web/web@1", "10.0.0.1:8080", ttl=30)  # type: ignore[arg-type]
    for _ in range(3):
        announcer.announce()
    assert etcd.granted == 1
    assert etcd.puts == [("/services/web/web@1", "10.0.0.1:8080", "lease1")] * 3


def test_a_lease_that_ran_out_is_replaced_and_the_key_written_again() -> None:
    etcd = FakeEtcd()
    announcer = Announcer(etcd, "/k", "v", ttl=30)  # type: ignore[arg-type]
    announcer.announce()
    etcd.expire()  # etcd was away longer than the TTL
    announcer.announce()
    assert etcd.granted == 2 and etcd.puts[-1] == ("/k", "v", "lease2")


def test_settings_come_from_the_environment_and_a_user_needs_a_password_file() -> None:
    etcd = Etcd.from_env({"ETCD_ENDPOINT": "https://10.0.0.1:2379", "ETCD_USERNAME": "discovery"})
    assert etcd.endpoint == "https://10.0.0.1:2379" and etcd.username == "discovery"
    try:
        etcd._login()
    except EtcdError as error:
        assert "ETCD_PASSWORD_FILE" in str(error)
    else:
        raise AssertionError("a user without a password file logged in")
    assert Etcd.from_env({}).endpoint == "http://127.0.0.1:2379"


def test_a_prefix_range_ends_after_every_key_under_it() -> None:
    assert base64.b64decode(_range_end("/services/web/")) == b"/services/web0"


def test_lab_fleetd_gets_etcd_secrets_as_files_only(tmp_path: Path) -> None:
    book = StateFile(tmp_path)
    secrets = tmp_path / etcd_access.SECRETS_DIR
    book.state = State(
        dir=str(tmp_path),
        network="loopback",
        bridge=None,
        agent_ttl="5s",
        token_file=str(tmp_path / "token"),
        etcd_secrets=str(secrets),
    )
    node = NodeState(name="node1", ip="127.0.0.11", machine_id="m1")
    for api, with_password in (("v3", True), ("v2", False)):
        book.state.etcd_api = api
        argv = fleetd_argv(book, node)

        def value(flag: str, argv: list[str] = argv) -> str:
            return argv[argv.index(flag) + 1]

        assert value("--etcd-api") == api
        assert value("--etcd-cafile") == str(secrets / "ca.pem")
        assert value("--etcd-certfile") == str(secrets / "fleet.pem")
        assert value("--etcd-keyfile") == str(secrets / "fleet.key")
        # v2 checks a password with bcrypt on every request: there the certificate names the user.
        assert ("--etcd-password-file" in argv) is with_password
        if with_password:
            assert value("--etcd-username") == "fleet"
            assert value("--etcd-password-file") == str(secrets / "fleet.password")
