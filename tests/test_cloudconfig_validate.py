"""Cloud-config validation: each finding's position, severity and message; the CLI; load()."""

from __future__ import annotations

import json
import textwrap

import pytest
from click.testing import CliRunner

from fleetpy.cloudinit import CloudConfigError, Finding, load, substitute, validate
from fleetpy.cloudinit.cli import validate_command
from fleetpy.fleetd.config import ConfigError, build_config

GZIP_B64_HELLO = "H4sIAAAAAAACA8tIzcnJBwCGphA2BQAAAA=="
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHKEY user@host"


def cc(body: str) -> str:
    """User-data with the header on line 1, so body line N is file line N + 1."""
    return "#cloud-config\n" + textwrap.dedent(body).lstrip("\n")


# Each case: (user-data, [(line, column, severity, message substring), ...]); the
# expected list is the complete set of findings.
CASES = {
    # header
    "header ok": (cc("hostname: a\n"), []),
    "header with trailing space and CRLF": ("#cloud-config \r\nhostname: a\r\n", []),
    "header missing": ("hostname: a\n", [(1, 1, "error", '"#cloud-config" line')]),
    "header misspelt": ("#cloud-cfg\nhostname: a\n", [(1, 1, "error", '"#cloud-config" line')]),
    "header only": ("#cloud-config\n", []),
    # YAML syntax
    "yaml bad indentation": (
        cc("coreos:\n  fleet:\n    metadata: a=b\n   public_ip: 1.2.3.4\n"),
        [(5, 4, "error", "YAML syntax error")],
    ),
    "yaml unclosed quote": (cc('hostname: "abc\n'), [(3, 1, "error", "found unexpected end")]),
    "yaml tab indentation": (cc("coreos:\n\tfleet: {}\n"), [(3, 1, "error", "YAML syntax error")]),
    "yaml control character": (cc("hostname: a\x00\n"), [(2, 12, "error", "#x0000 is not allowed")]),
    "yaml bad merge": (cc("coreos:\n  <<: 1\n"), [(3, 7, "error", "coreos: expected a mapping")]),
    "yaml non-string key": (cc("? [a]\n: 1\n"), [(2, 3, "error", "keys must be strings")]),
    "yaml top level list": (cc("- a\n- b\n"), [(2, 1, "error", "top level, got list")]),
    # hostname
    "hostname ok": (cc("hostname: core-01.example.com\n"), []),
    "hostname numeric is text": (cc("hostname: 1234\n"), []),
    "hostname invalid": (cc("hostname: core_01!\n"), [(2, 11, "error", "not a valid hostname")]),
    "hostname list": (cc("hostname: [a]\n"), [(2, 11, "error", "hostname: expected string, got list")]),
    # ssh keys
    "ssh keys ok": (cc(f"ssh_authorized_keys:\n  - {SSH_KEY}\n"), []),
    "ssh keys with options": (cc(f'ssh_authorized_keys:\n  - no-pty,from="10.0.0.1" {SSH_KEY}\n'), []),
    "ssh keys not list": (
        cc(f"ssh_authorized_keys: {SSH_KEY}\n"),
        [(2, 22, "error", "ssh_authorized_keys: expected list, got string")],
    ),
    "ssh key garbage": (
        cc("ssh_authorized_keys:\n  - hello world\n"),
        [(3, 5, "error", "ssh_authorized_keys[0]: does not look like an SSH public key")],
    ),
    "ssh key dash spelling": (cc(f"ssh-authorized-keys:\n  - {SSH_KEY}\n"), []),
    # write_files
    "write_files ok": (
        cc(
            f"""
            write_files:
              - path: /etc/motd
                permissions: "0644"
                owner: root:root
                content: hi
              - path: /etc/x
                permissions: 0600
                encoding: gzip+base64
                content: {GZIP_B64_HELLO}
            """
        ),
        [],
    ),
    "write_files missing path": (
        cc("write_files:\n  - content: x\n"),
        [(3, 5, "error", 'write_files[0]: missing required key "path"')],
    ),
    "write_files relative path": (
        cc("write_files:\n  - path: etc/motd\n"),
        [(3, 11, "error", '"etc/motd" is not an absolute path')],
    ),
    "write_files bad permissions": (
        cc("write_files:\n  - path: /a\n    permissions: '0888'\n"),
        [(4, 18, "error", 'invalid permissions "0888"')],
    ),
    "write_files permissions list": (
        cc("write_files:\n  - path: /a\n    permissions: [1]\n"),
        [(4, 18, "error", "permissions: expected string, got list")],
    ),
    "write_files bad encoding": (
        cc("write_files:\n  - path: /a\n    encoding: rot13\n    content: x\n"),
        [(4, 15, "error", 'invalid value "rot13"')],
    ),
    "write_files undecodable": (
        cc("write_files:\n  - path: /a\n    encoding: b64\n    content: '!!!'\n"),
        [(5, 14, "error", 'content: cannot be decoded as "b64"')],
    ),
    "write_files gzip of plain text": (
        cc("write_files:\n  - path: /a\n    encoding: gzip+base64\n    content: aGVsbG8=\n"),
        [(5, 14, "error", 'cannot be decoded as "gzip+base64"')],
    ),
    "write_files unknown key": (
        cc("write_files:\n  - path: /a\n    mode: '0644'\n"),
        [(4, 5, "warning", 'unknown key "write_files[0].mode"')],
    ),
    # users
    "users ok": (
        cc(
            f"""
            users:
              - name: core
                passwd: $6$rounds=4096$salt$hash
                groups: [sudo, docker]
                no-create-home: true
                ssh-authorized-keys:
                  - {SSH_KEY}
            """
        ),
        [],
    ),
    "users missing name": (
        cc("users:\n  - groups: [docker]\n"),
        [(3, 5, "error", 'users[0]: missing required key "name"')],
    ),
    "users groups not list": (
        cc("users:\n  - name: core\n    groups: docker\n"),
        [(4, 13, "error", "users[0].groups: expected list, got string")],
    ),
    "users system not bool": (
        cc("users:\n  - name: core\n    system: 'true'\n"),
        [(4, 13, "error", "expected boolean, got string")],
    ),
    "users deprecated github import": (
        cc("users:\n  - name: core\n    coreos-ssh-import-github: someone\n"),
        [(4, 5, "warning", 'deprecated key "users[0].coreos-ssh-import-github"')],
    ),
    # etcd2
    "etcd2 ok": (
        cc(
            """
            coreos:
              etcd2:
                name: node1
                discovery: https://discovery.etcd.io/abc
                advertise-client-urls: http://$public_ipv4:2379
                initial_advertise_peer_urls: http://$private_ipv4:2380
                listen-client-urls: http://0.0.0.0:2379,http://0.0.0.0:4001
                listen_peer_urls: http://$private_ipv4:2380
                initial-cluster: node1=http://10.0.0.1:2380,node2=http://10.0.0.2:2380
                initial-cluster-state: new
                initial-cluster-token: tok
                data-dir: /var/lib/etcd2
                heartbeat-interval: 100
                election-timeout: 1000
                proxy: "off"
            """
        ),
        [],
    ),
    "etcd2 bad url": (
        cc("coreos:\n  etcd2:\n    listen-client-urls: 0.0.0.0:2379\n"),
        [(4, 25, "error", '"0.0.0.0:2379" is not a URL')],
    ),
    "etcd2 bad cluster state": (
        cc("coreos:\n  etcd2:\n    initial-cluster-state: fresh\n"),
        [(4, 28, "error", 'invalid value "fresh" (valid: new, existing)')],
    ),
    "etcd2 bad initial cluster": (
        cc("coreos:\n  etcd2:\n    initial_cluster: http://10.0.0.1:2380\n"),
        [(4, 22, "error", "is not a NAME=URL cluster member")],
    ),
    "etcd2 int as string": (
        cc("coreos:\n  etcd2:\n    snapshot-count: '10000'\n"),
        [(4, 21, "error", "snapshot-count: expected integer, got string")],
    ),
    "etcd2 bad proxy": (
        cc("coreos:\n  etcd2:\n    proxy: sometimes\n"),
        [(4, 12, "error", 'invalid value "sometimes"')],
    ),
    "etcd2 unknown key": (
        cc("coreos:\n  etcd2:\n    peer-addr: 10.0.0.1:7001\n"),
        [(4, 5, "warning", 'unknown key "coreos.etcd2.peer-addr"')],
    ),
    "etcd2 not a mapping": (
        cc("coreos:\n  etcd2: node1\n"),
        [(3, 10, "error", "coreos.etcd2: expected mapping, got string")],
    ),
    # fleet
    "fleet ok": (
        cc(
            """
            coreos:
              fleet:
                public-ip: $public_ipv4
                metadata: region=us-west,disk=ssd
                etcd_servers: http://127.0.0.1:2379
                etcd-key-prefix: /_coreos.com/fleet/
                etcd_cafile: /etc/ssl/ca.pem
                etcd_certfile: /etc/ssl/cert.pem
                etcd_keyfile: /etc/ssl/key.pem
                etcd-request-timeout: 1.5
                engine_reconcile_interval: 2
                agent-ttl: 30s
                disable-engine: false
                disable_watches: true
                token_limit: 100
                verbosity: 1
            """
        ),
        [],
    ),
    "fleet bad public ip": (
        cc("coreos:\n  fleet:\n    public_ip: 10.0.0.300\n"),
        [(4, 16, "error", '"10.0.0.300" is not an IP address')],
    ),
    "fleet bad metadata": (
        cc("coreos:\n  fleet:\n    metadata: region\n"),
        [(4, 15, "error", "bad metadata 'region': expected key=value")],
    ),
    "fleet metadata without a value": (
        cc("coreos:\n  fleet:\n    metadata: role=\n"),
        [(4, 15, "error", "bad metadata 'role=': expected key=value")],
    ),
    "fleet verbosity as word": (
        cc("coreos:\n  fleet:\n    verbosity: debug\n"),
        [(4, 16, "error", "coreos.fleet.verbosity: expected integer, got string")],
    ),
    "fleet timeout as string": (
        cc("coreos:\n  fleet:\n    etcd_request_timeout: 1s\n"),
        [(4, 27, "error", "expected number, got string")],
    ),
    "fleet bad agent ttl": (
        cc("coreos:\n  fleet:\n    agent_ttl: thirty\n"),
        [(4, 16, "error", "bad duration 'thirty'")],
    ),
    "fleet negative agent ttl": (
        cc("coreos:\n  fleet:\n    agent_ttl: -5s\n"),
        [(4, 16, "error", "cannot be negative")],
    ),
    "fleet agent ttl under a second": (
        cc("coreos:\n  fleet:\n    agent_ttl: 500ms\n"),
        [(4, 16, "error", "at least 1s")],
    ),
    "fleet etcd servers without scheme": (
        cc("coreos:\n  fleet:\n    etcd-servers: 10.0.0.1:2379\n"),
        [(4, 19, "error", '"10.0.0.1:2379" is not a URL')],
    ),
    "fleet disable_engine not bool": (
        cc("coreos:\n  fleet:\n    disable_engine: 1\n"),
        [(4, 21, "error", "expected boolean, got integer")],
    ),
    "fleet unknown key": (
        cc("coreos:\n  fleet:\n    etcd_server: http://a:2379\n"),
        [(4, 5, "warning", 'unknown key "coreos.fleet.etcd_server"')],
    ),
    # units
    "units ok": (
        cc(
            """
            coreos:
              units:
                - name: etcd2.service
                  command: start
                - name: app@.service
                  enable: yes
                  runtime: true
                  content: |
                    [Service]
                    ExecStart=/bin/true
                - name: docker.socket
                  mask: true
                - name: fleet.service
                  command: reload-or-try-restart
                  drop-ins:
                    - name: 50-env.conf
                      content: "[Service]\\nEnvironment=A=1\\n"
            """
        ),
        [],
    ),
    "units bad command": (
        cc("coreos:\n  units:\n    - name: a.service\n      command: begin\n"),
        [(5, 16, "error", 'invalid value "begin" (valid: start, stop, restart')],
    ),
    "units missing name": (
        cc("coreos:\n  units:\n    - command: start\n"),
        [(4, 7, "error", 'coreos.units[0]: missing required key "name"')],
    ),
    "units bad name suffix": (
        cc("coreos:\n  units:\n    - name: hello.txt\n"),
        [(4, 13, "error", "invalid unit name")],
    ),
    "units bad name chars": (
        cc("coreos:\n  units:\n    - name: my app.service\n"),
        [(4, 13, "error", "invalid unit name")],
    ),
    "units enable as string": (
        cc("coreos:\n  units:\n    - name: a.service\n      enable: 'true'\n"),
        [(5, 15, "error", "coreos.units[0].enable: expected boolean, got string")],
    ),
    "units not a list": (
        cc("coreos:\n  units:\n    name: a.service\n"),
        [(4, 5, "error", "coreos.units: expected list, got mapping")],
    ),
    "units drop-in missing name": (
        cc("coreos:\n  units:\n    - name: a.service\n      drop_ins:\n        - content: x\n"),
        [(6, 11, "error", 'coreos.units[0].drop_ins[0]: missing required key "name"')],
    ),
    "units drop-in not conf": (
        cc("coreos:\n  units:\n    - name: a.service\n      drop-ins:\n        - name: 10-a\n"),
        [(6, 17, "warning", 'drop-in "10-a" does not end in .conf')],
    ),
    "units unknown key": (
        cc("coreos:\n  units:\n    - name: a.service\n      start: true\n"),
        [(5, 7, "warning", 'unknown key "coreos.units[0].start"')],
    ),
    # update, locksmith, flannel
    "update locksmith flannel ok": (
        cc(
            """
            coreos:
              update:
                reboot-strategy: off
                group: stable
              locksmith:
                window-start: Thu 04:00
                window-length: 1h30m
              flannel:
                interface: $private_ipv4
                etcd_prefix: /coreos.com/network
            """
        ),
        [],
    ),
    "update bad strategy": (
        cc("coreos:\n  update:\n    reboot_strategy: sometimes\n"),
        [(4, 22, "error", 'invalid value "sometimes"')],
    ),
    "update best-effort deprecated": (
        cc("coreos:\n  update:\n    reboot-strategy: best-effort\n"),
        [(4, 22, "warning", 'deprecated value "best-effort"')],
    ),
    "locksmith bad window": (
        cc("coreos:\n  locksmith:\n    window_start: 25:00\n"),
        [(4, 19, "error", "is not a reboot window start")],
    ),
    # deprecated keys
    "deprecated etcd v1": (
        cc("coreos:\n  etcd:\n    addr: $private_ipv4:4001\n"),
        [(3, 3, "warning", 'deprecated key "coreos.etcd": etcd v1 is no longer supported')],
    ),
    "deprecated etcd2 ca_file": (
        cc("coreos:\n  etcd2:\n    ca-file: /ca.pem\n"),
        [(4, 5, "warning", 'deprecated key "coreos.etcd2.ca-file"')],
    ),
    "deprecated fleet verify_units": (
        cc("coreos:\n  fleet:\n    verify_units: true\n"),
        [(4, 5, "warning", 'deprecated key "coreos.fleet.verify_units": fleetd ignores it')],
    ),
    # dashes and underscores
    "dash and underscore duplicate": (
        cc("coreos:\n  fleet:\n    public-ip: 10.0.0.1\n    public_ip: 10.0.0.2\n"),
        [(5, 5, "warning", 'duplicate key "coreos.fleet.public_ip" (also on line 4 as "public-ip")')],
    ),
    "plain duplicate": (
        cc("hostname: a\nhostname: b\n"),
        [(3, 1, "warning", 'duplicate key "hostname" (also on line 2)')],
    ),
    "dash in top level key": (cc("write-files:\n  - path: /a\n"), []),
    # unknown and misplaced keys; real cloud-init keys
    "unknown top level key": (cc("hostnam: a\n"), [(2, 1, "warning", 'unknown key "hostnam"')]),
    "units at top level": (
        cc("units:\n  - name: a.service\n"),
        [(2, 1, "warning", "(units belongs under coreos:)")],
    ),
    "write_files under coreos": (
        cc("coreos:\n  write_files: []\n"),
        [(3, 3, "warning", "(write_files belongs at the top level, not under coreos)")],
    ),
    "cloud-init keys accepted": (
        cc("runcmd:\n  - [ls, -l]\n  - echo hi\nbootcmd: [echo]\npackages: [vim]\n"),
        [],
    ),
    "empty values mean unset": (cc("hostname:\ncoreos:\n  fleet:\n  units:\n"), []),
    "yaml merge key": (
        cc(
            """
            base: &base {command: start}
            coreos:
              units:
                - <<: *base
                  name: a.service
            """
        ),
        [(2, 1, "warning", 'unknown key "base"')],
    ),
}


@pytest.mark.parametrize(("text", "expected"), list(CASES.values()), ids=list(CASES))
def test_validate(text: str, expected: list[tuple[int, int, str, str]]) -> None:
    findings = validate(text)
    assert [(f.line, f.column, f.severity) for f in findings] == [e[:3] for e in expected]
    for finding, (*_, substring) in zip(findings, expected, strict=True):
        assert substring in finding.message


def test_findings_are_sorted_by_position() -> None:
    findings = validate("hostname: x!\nfoo: 1\n")
    assert [(f.line, f.column) for f in findings] == [(1, 1), (1, 11), (2, 1)]


def test_finding_to_json() -> None:
    finding = Finding(3, 7, "error", "boom")
    assert finding.to_json() == {"line": 3, "column": 7, "severity": "error", "message": "boom"}


@pytest.fixture
def files(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(cc("hostname: a\nfoo: 1\n"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(cc("coreos:\n  units:\n    - name: a.service\n      command: begin\n"))
    return good, bad


def test_cli_text_warnings_only_exit_zero(files) -> None:
    good, _ = files
    result = CliRunner().invoke(validate_command, [str(good)])
    assert result.exit_code == 0
    assert result.output == f'{good}:3:1: warning: unknown key "foo"\n'


def test_cli_text_error_exit_one(files) -> None:
    good, bad = files
    result = CliRunner().invoke(validate_command, [str(good), str(bad)])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0] == f'{good}:3:1: warning: unknown key "foo"'
    assert lines[1].startswith(f'{bad}:5:16: error: coreos.units[0].command: invalid value "begin"')
    assert len(lines) == 2


def test_cli_json(files) -> None:
    good, bad = files
    result = CliRunner().invoke(validate_command, [str(good), str(bad), "--format", "json"])
    assert result.exit_code == 1
    records = json.loads(result.output)
    assert [(r["file"], r["line"], r["column"], r["severity"]) for r in records] == [
        (str(good), 3, 1, "warning"),
        (str(bad), 5, 16, "error"),
    ]
    assert set(records[0]) == {"file", "line", "column", "severity", "message"}


def test_cli_json_clean_file_is_empty_list(tmp_path) -> None:
    clean = tmp_path / "clean.yaml"
    clean.write_text(cc("hostname: a\n"))
    result = CliRunner().invoke(validate_command, ["--format", "json", str(clean)])
    assert result.exit_code == 0
    assert json.loads(result.output) == []


def test_cli_missing_file_is_usage_error(tmp_path) -> None:
    result = CliRunner().invoke(validate_command, [str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2


def test_substitute() -> None:
    text = "a=$private_ipv4 b=$public_ipv4 c=\\$public_ipv4 d=$private_ipv6"
    assert substitute(text, "10.0.0.1", "1.2.3.4") == "a=10.0.0.1 b=1.2.3.4 c=$public_ipv4 d=$private_ipv6"


def test_substitute_leaves_unknown_addresses() -> None:
    assert substitute("ip=$public_ipv4", "10.0.0.1", None) == "ip=$public_ipv4"


def test_load_normalises_and_types_values() -> None:
    config = load(
        cc(
            f"""
            hostname: core-01
            ssh-authorized-keys: ["{SSH_KEY}"]
            write-files:
              - path: /etc/x
                permissions: 0644
                encoding: gzip+base64
                content: {GZIP_B64_HELLO}
            users:
              - name: core
                no-create-home: true
            coreos:
              etcd2:
                initial-cluster-state: new
                heartbeat-interval: 100
              fleet:
                public-ip: $public_ipv4
                verbosity: 1
              update:
                reboot-strategy: off
              units:
                - name: fleet.service
                  command: start
                  enable: yes
                  drop-ins:
                    - name: 10-a.conf
                      content: x
            unknown: ignored
            """
        )
    )
    assert config.hostname == "core-01"
    assert config.ssh_authorized_keys == [SSH_KEY]
    (wf,) = config.write_files
    assert (wf.path, wf.permissions, wf.decoded()) == ("/etc/x", 0o644, b"hello")
    assert config.users == [{"name": "core", "no_create_home": True}]
    assert config.etcd2 == {"initial_cluster_state": "new", "heartbeat_interval": 100}
    assert config.fleet == {"public_ip": "$public_ipv4", "verbosity": 1}
    assert config.update == {"reboot_strategy": "off"}
    (unit,) = config.units
    assert (unit.name, unit.command, unit.enable, unit.runtime) == ("fleet.service", "start", True, False)
    assert [(d.name, d.content) for d in unit.drop_ins] == [("10-a.conf", "x")]


def test_load_raises_with_findings() -> None:
    with pytest.raises(CloudConfigError) as info:
        load("hostname: a\n")
    assert [f.severity for f in info.value.findings] == ["error"]
    assert '1:1: error: user-data must begin with a "#cloud-config" line' in str(info.value)


def test_load_header_only() -> None:
    assert load("#cloud-config\n").units == []


@pytest.mark.parametrize(
    "option,value",
    [
        ("agent_ttl", "-5s"), ("agent_ttl", "500ms"), ("agent_ttl", "ten"), ("agent_ttl", "30s"),
        ("agent_ttl", "1m30s"), ("agent_ttl", "7"), ("metadata", "role="), ("metadata", "role"),
        ("metadata", "=web"), ("metadata", "role=web,zone=a"), ("metadata", "role=web, zone=a"),
        ("capacity", "cpus=2,memory=4G"), ("capacity", "memory=1.5G,disk=100G"), ("capacity", "cpus=150%"),
        ("capacity", "gpus=1"), ("capacity", "memory=lots"), ("capacity", "cpus"),
        ("facts_interval", "10s"), ("facts_interval", "0"), ("facts_interval", "soon"),
        ("shared_volume_dir", "/mnt/volumes"), ("shared_volume_dir", "mnt/volumes"),
    ],
)  # fmt: skip
def test_validate_accepts_exactly_what_fleetd_accepts(option: str, value: str, tmp_path) -> None:
    findings = validate(cc(f"coreos:\n  fleet:\n    {option}: '{value}'\n"))
    try:
        build_config({option: value}, {"FLEET_CONFIG": str(tmp_path / "absent.conf")})
        fleetd_refuses = False
    except ConfigError:
        fleetd_refuses = True
    assert bool(findings) == fleetd_refuses, findings
