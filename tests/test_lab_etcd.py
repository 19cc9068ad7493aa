"""The lab's etcd is locked (issue 9, B14): TLS only, a lab certificate, a password, one prefix per user.

One lab per etcd API its fleetds use: v3 (the default, etcd's v2 API off) and v2 (`lab up
--etcd-api v2`, v2 on with its own auth). Each is a real etcd, real systemd --user nodes and
real fleetds, on loopback addresses so no bridge is needed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import stat
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from labtools import wait_for

from fleetpy.cli.fleetctl import cli
from fleetpy.lab import etcd_access
from fleetpy.lab.lab import Lab
from fleetpy.registry import Registry, StoreError
from fleetpy.registry.connect import EtcdOptions, open_store
from fleetpy.registry.store import Credentials

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["v3", "v2"])
def lab(request, tmp_path_factory) -> Iterator[Lab]:
    lab = Lab(tmp_path_factory.mktemp(f"etcd-{request.param}"))
    try:
        lab.up(node_count=2, network="loopback", agent_ttl="3s", containers=False, etcd_api=request.param)
        yield lab
    finally:
        lab.down()


def secrets_dir(lab: Lab) -> Path:
    assert lab.state is not None and lab.state.etcd_secrets
    return Path(lab.state.etcd_secrets)


def https(lab: Lab, path: str, client: str | None, body: dict | None = None, basic: str | None = None):
    """(HTTP status, body) of a request to the lab's etcd, showing `client`'s certificate."""
    assert lab.state is not None
    directory = secrets_dir(lab)
    context = ssl.create_default_context(cafile=str(directory / "ca.pem"))
    if client:
        context.load_cert_chain(directory / f"{client}.pem", directory / f"{client}.key")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(lab.state.etcd_urls[0] + path, data=data)
    if basic:
        password = etcd_access.password_file(directory, basic).read_text().strip()
        request.add_header(
            "Authorization", "Basic " + base64.b64encode(f"{basic}:{password}".encode()).decode()
        )
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def store_as(lab: Lab, user: str, api: str):
    assert lab.state is not None
    directory = secrets_dir(lab)
    if user == etcd_access.DISCOVERY:  # no CN on its certificate: it always logs in
        client = etcd_access.tls(directory, user)
        password = etcd_access.password_file(directory, user).read_text().strip()
        credentials = Credentials(client.ca, (client.cert, client.key), user, password)
    else:
        credentials = etcd_access.credentials(directory, user, api)
    return open_store(EtcdOptions(tuple(lab.state.etcd_urls), credentials=credentials, retry_for=1), api)


def test_etcd_serves_only_tls_clients_with_a_certificate_of_the_lab(lab: Lab) -> None:
    assert lab.state is not None
    url = lab.state.etcd_urls[0]
    assert url.startswith("https://")
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain http to the TLS port
        urllib.request.urlopen(url.replace("https://", "http://") + "/version", timeout=5)
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        https(lab, "/version", client=None)  # TLS, but no client certificate
    assert https(lab, "/version", client="root")[0] == 200


def test_v2_is_served_only_to_a_lab_whose_fleetds_use_it(lab: Lab) -> None:
    assert lab.state is not None
    status, _ = https(lab, "/v2/keys/", client="root", basic="root")
    assert status == (200 if lab.state.etcd_api == "v2" else 404)
    if lab.state.etcd_api == "v2":
        # v2 has auth of its own: a certificate without a user's CN (the guest role) reads
        # nothing; fleet's certificate names its user (its CN), which may read the registry.
        try:
            guest = https(lab, "/v2/keys/_fleetpy/", client="discovery")[0]
        except ConnectionError:  # etcd 3.4 sometimes drops it instead of answering 401
            guest = 401
        assert guest in (401, 403)
        assert https(lab, "/v2/keys/_fleetpy/", client="fleet")[0] == 200
        assert https(lab, "/v2/keys/services/", client="fleet")[0] in (401, 403)


def test_each_user_reaches_only_its_own_prefix(lab: Lab) -> None:
    assert lab.state is not None
    api = lab.state.etcd_api

    async def check() -> None:
        fleet, discovery = store_as(lab, "fleet", api), store_as(lab, "discovery", api)
        try:
            assert await fleet.list("/_fleetpy/machines")
            with pytest.raises(StoreError):
                await fleet.put("/services/web/x", "fleet may not")
            with pytest.raises(StoreError):
                await discovery.put("/_fleetpy/job/evil.service/object", "discovery may not")
            with pytest.raises(StoreError):
                await discovery.get("/_fleetpy/version")
        finally:
            await fleet.close()
            await discovery.close()

    asyncio.run(check())
    if api == "v3":
        # The sidekicks' way in (the JSON gateway): no token, no access.
        status, body = https(lab, "/v3/kv/range", client="discovery", body={"key": "L3NlcnZpY2VzLw=="})
        assert status != 200 and ("permission denied" in body or "user name is empty" in body), body
        etcd = lab.discovery_etcd()
        etcd.put("/services/test/a", "1")
        assert etcd.list("/services/test/") == {"/services/test/a": ("1", -1)}
        etcd.delete("/services/test/a")


def test_secrets_are_private_files_and_never_on_a_command_line(lab: Lab) -> None:
    directory = secrets_dir(lab)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    passwords = []
    for path in directory.iterdir():
        if path.suffix in (".key", ".password"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        if path.suffix == ".password":
            passwords.append(path.read_text().strip())
    assert len(passwords) == 3
    assert lab.state is not None
    fleetd_pids = {n.fleetd_pid for n in lab.state.nodes}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        assert not any(p in argv for p in passwords), f"a password is on the command line of {proc.name}"
        if int(proc.name) in fleetd_pids:
            assert "--etcd-certfile\0" in argv
            if lab.state.etcd_api == "v3":
                assert "--etcd-password-file\0" in argv
    # The lab itself reads the registry as `fleet` (lab status), on the lab's API.
    assert len(lab.machines()) == 2


def test_fleet_schedules_on_the_labs_backend(lab: Lab, tmp_path: Path) -> None:
    (tmp_path / "hello.service").write_text("[Service]\nExecStart=/bin/sleep 100000\n")
    endpoint = lab.endpoint()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = CliRunner().invoke(cli, ["--endpoint", endpoint, "start", "hello.service"])
        assert result.exit_code == 0, result.output

        def active() -> bool:
            out = CliRunner().invoke(cli, ["--endpoint", endpoint, "list-units", "--no-legend"]).output
            return "hello.service" in out and "active" in out

        wait_for("hello.service active", active)
        assert lab.state is not None

        async def stored() -> list[str]:
            registry = Registry(store_as(lab, "fleet", lab.state.etcd_api), "/_fleetpy/")
            try:
                return [j.name for j in await registry.jobs()]
            finally:
                await registry.close()

        assert asyncio.run(stored()) == ["hello.service"]
        CliRunner().invoke(cli, ["--endpoint", endpoint, "destroy", "hello.service"])
    finally:
        os.chdir(cwd)
