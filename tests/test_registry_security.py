"""Both etcd backends against a real etcd that wants TLS client certificates and a password.

One etcd (3.4, v2 on so both APIs are there) serves https only to clients with a certificate
from its CA, with v3 auth and v2 auth on: user `fleetpy` may read and write only under the
test prefix. Each backend must work with the right credentials and be refused without them.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest

from fleetpy.fleetd.config import build_config
from fleetpy.fleetd.main import etcd_options
from fleetpy.lab.etcd import enable_auth, make_pki, start_cluster
from fleetpy.registry import Assignment, Credentials, Job, Machine, Registry, StoreError, open_store
from fleetpy.registry.etcd2 import EtcdV2Store
from fleetpy.registry.etcd3 import EtcdV3Store
from fleetpy.unit import UnitFile

pytestmark = pytest.mark.integration

PREFIX = "/secure/"
PASSWORD = "s3cret-pw"
HELLO = UnitFile.parse("[Service]\nExecStart=/bin/sleep 1000\n")
STORES = {"v2": EtcdV2Store, "v3": EtcdV3Store}


@pytest.fixture(scope="module")
def secure_etcd():
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="fleetpy-etcd-tls-") as base:
        pki = make_pki(Path(base) / "pki", clients=("root", "fleetpy", "stranger"))
        members = start_cluster(Path(base), enable_v2=True, tls=pki["server"], health_client=pki["root"])
        try:
            enable_auth(members[0], "root-pw", {"fleetpy": PASSWORD}, PREFIX, client=pki["root"], v2=True)
            yield members[0], pki
        finally:
            for member in members:
                member.stop()


def credentials(pki, *, password: str | None = PASSWORD, cert: str | None = "fleetpy") -> Credentials:
    client = pki[cert] if cert else None
    return Credentials(
        ca_cert=pki["server"].ca,
        cert=(client.cert, client.key) if client else None,
        username="fleetpy" if password else None,
        password=password,
    )


@pytest.mark.parametrize("api", ["v2", "v3"])
async def test_tls_with_a_client_certificate_and_a_password_works(secure_etcd, api):
    member, pki = secure_etcd
    registry = Registry(STORES[api]([member.client_url], credentials=credentials(pki)), PREFIX + api)
    try:
        await registry.ensure_schema()
        await registry.submit(HELLO, Job("hello.service", HELLO.hash, "launched"))
        await registry.register_machine(Machine("m1", "10.0.0.1"), ttl=30)
        assert await registry.refresh_machine("m1", ttl=30)
        start = await registry.index()
        watch = asyncio.create_task(registry.wait(start, "schedule", "m1", timeout=5))
        await registry.assign(Assignment("hello.service", "m1", HELLO.hash, "launched"))
        assert await watch is not None
        assert [j.name for j in await registry.jobs()] == ["hello.service"]
    finally:
        await registry.store.delete(PREFIX + api, recursive=True)
        await registry.close()


@pytest.mark.parametrize("api", ["v2", "v3"])
async def test_a_wrong_password_is_refused_with_a_clear_error(secure_etcd, api):
    member, pki = secure_etcd
    store = STORES[api]([member.client_url], credentials=credentials(pki, password="wrong"), retry_for=1)
    registry = Registry(store, PREFIX)
    try:
        with pytest.raises(StoreError, match="etcd refused"):
            await registry.jobs()
    finally:
        await registry.close()


@pytest.mark.parametrize("api", ["v2", "v3"])
async def test_no_password_reads_nothing(secure_etcd, api):
    member, pki = secure_etcd
    # v3 with a client certificate and no password logs in as the certificate's CN.
    store = STORES[api]([member.client_url], credentials=credentials(pki, password=None, cert="stranger"))
    registry = Registry(store, PREFIX)
    try:
        with pytest.raises(StoreError):
            await registry.submit(HELLO, Job("hello.service", HELLO.hash, "launched"))
    finally:
        await registry.close()


@pytest.mark.parametrize("api", ["v2", "v3"])
async def test_without_a_client_certificate_etcd_is_not_reached(secure_etcd, api):
    member, pki = secure_etcd
    store = STORES[api]([member.client_url], credentials=credentials(pki, cert=None), retry_for=1)
    registry = Registry(store, PREFIX)
    try:
        with pytest.raises(StoreError):
            await registry.jobs()
    finally:
        await registry.close()


async def test_the_user_may_not_write_outside_the_registrys_prefix(secure_etcd):
    member, pki = secure_etcd
    registry = Registry(EtcdV3Store([member.client_url], credentials=credentials(pki)), "/elsewhere/")
    try:
        with pytest.raises(StoreError, match="permission denied"):
            await registry.ensure_schema()
    finally:
        await registry.close()


async def test_fleetd_flags_reach_the_store(secure_etcd, tmp_path):
    """--etcd-username and --etcd-password-file (and the TLS files), as fleetd reads them."""
    member, pki = secure_etcd
    (tmp_path / "password").write_text(PASSWORD + "\n")
    (tmp_path / "fleet.conf").write_text("")
    config = build_config(
        {
            "etcd_servers": member.client_url,
            "etcd_api": "v3",
            "etcd_key_prefix": PREFIX,
            "etcd_cafile": pki["server"].ca,
            "etcd_certfile": pki["fleetpy"].cert,
            "etcd_keyfile": pki["fleetpy"].key,
            "etcd_username": "fleetpy",
            "etcd_password_file": str(tmp_path / "password"),
        },
        environ={},
        config_file=str(tmp_path / "fleet.conf"),
    )
    options = etcd_options(config)
    assert options.credentials.password == PASSWORD
    registry = Registry(open_store(options, "v3"), PREFIX)
    try:
        await registry.ensure_schema()
    finally:
        await registry.close()
