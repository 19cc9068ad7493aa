"""A throwaway cluster CA and certificates, for the API's TLS and mTLS tests.

trustme makes them in-process with EC keys, in milliseconds; openssl in subprocesses with RSA
keys took seconds, which the fast subset paid on every run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Path:
    """ca.pem signs server (for 127.0.0.1) and client; other-ca.pem signs stranger and rogue.

    Every certificate is <name>.pem with its key in <name>.key, valid for 127.0.0.1.
    """
    d = tmp_path_factory.mktemp("pki")
    cas = {"ca": trustme.CA(), "other-ca": trustme.CA()}
    for name, ca in cas.items():
        ca.cert_pem.write_to_path(d / f"{name}.pem")
    for name, ca in (("server", "ca"), ("client", "ca"), ("stranger", "other-ca"), ("rogue", "other-ca")):
        cert = cas[ca].issue_cert("127.0.0.1", common_name=name)
        cert.cert_chain_pems[0].write_to_path(d / f"{name}.pem")
        cert.private_key_pem.write_to_path(d / f"{name}.key")
    return d
