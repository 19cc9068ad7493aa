"""Who may use the lab's etcd: its CA and certificates, its users, and their password files.

The lab's etcd serves clients (and its peers) over TLS only, to clients with a certificate
from the lab's own CA, and with auth on:
- `root` (the lab's own bootstrap: users, roles, `auth enable`);
- `fleet`, which may read and write only under the registry's prefix: every lab fleetd, and
  the lab's own reads (`lab status`);
- `discovery`, which may read and write only under /services/: the example sidekicks
  (units/web-discovery@.service) and the demo reading what they announce.
Everything lives in <lab dir>/etcd-secrets (0700; keys and passwords 0600), and is named to
processes by path only: no secret is ever on a command line. A node gets a copy of the
discovery files in its own /etc/fleetpy, as a machine of its own would have them.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from fleetpy.lab.etcd import TLS, EtcdMember, enable_auth, make_pki
from fleetpy.registry.store import Credentials

SECRETS_DIR = "etcd-secrets"
ROOT, FLEET, DISCOVERY = "root", "fleet", "discovery"
DISCOVERY_PREFIX = "/services/"


def make(lab_dir: Path, host: str) -> Path:
    """The CA, a server certificate for `host`, client certificates and a password per user."""
    directory = lab_dir / SECRETS_DIR
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    make_pki(directory, clients=(ROOT, FLEET), host=host, gateway_clients=(DISCOVERY,))
    for user in (ROOT, FLEET, DISCOVERY):
        write_secret(password_file(directory, user), secrets.token_urlsafe(24) + "\n")
    return directory


def write_secret(path: Path, text: str) -> None:
    """A file only its owner may read, from the moment it exists."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)


def password_file(directory: Path, user: str) -> Path:
    return directory / f"{user}.password"


def tls(directory: Path, user: str) -> TLS:
    return TLS(str(directory / "ca.pem"), str(directory / f"{user}.pem"), str(directory / f"{user}.key"))


def server_tls(directory: Path) -> TLS:
    return tls(directory, "server")


def lock(member: EtcdMember, directory: Path, registry_prefix: str, v2: bool) -> None:
    """Turn auth on: `fleet` limited to the registry's prefix, `discovery` to /services/."""
    enable_auth(
        member,
        password_file(directory, ROOT).read_text().strip(),
        {
            FLEET: (password_file(directory, FLEET).read_text().strip(), registry_prefix),
            DISCOVERY: (password_file(directory, DISCOVERY).read_text().strip(), DISCOVERY_PREFIX),
        },
        client=tls(directory, ROOT),
        v2=v2,
    )


# etcd's v2 API checks a password with bcrypt on every request (tens of milliseconds each,
# serialized): a lab of fleetds on v2 then times out. There the client certificate alone names
# the user (etcd maps its CN to the v2 user of that name); v3 logs in once per token.
def _with_password(api: str) -> bool:
    return api == "v3"


def credentials(directory: Path, user: str, api: str) -> Credentials:
    """How `user` (root or fleet: their certificates have a CN) reaches etcd's `api`."""
    client = tls(directory, user)
    password = password_file(directory, user).read_text().strip() if _with_password(api) else None
    return Credentials(
        ca_cert=client.ca,
        cert=(client.cert, client.key),
        username=user if password else None,
        password=password,
    )


def fleetd_flags(directory: Path, api: str) -> list[str]:
    """fleetd's etcd security options: files only, never the password itself."""
    client = tls(directory, FLEET)
    flags = ["--etcd-cafile", client.ca, "--etcd-certfile", client.cert, "--etcd-keyfile", client.key]
    if _with_password(api):
        flags += ["--etcd-username", FLEET, "--etcd-password-file", str(password_file(directory, FLEET))]
    return flags


def discovery_env(directory: Path, into: Path, seen_as: Path) -> list[str]:
    """Copy the discovery user's files into `into` (a node's /etc/fleetpy, which the node sees
    at `seen_as`) and return the discovery.env lines naming them."""
    client = tls(directory, DISCOVERY)
    copies = {
        "etcd-ca.pem": client.ca,
        "etcd-discovery.pem": client.cert,
        "etcd-discovery.key": client.key,
        "etcd-discovery.password": str(password_file(directory, DISCOVERY)),
    }
    for name, source in copies.items():
        write_secret(into / name, Path(source).read_text())
    return [
        f"ETCD_CACERT={seen_as / 'etcd-ca.pem'}",
        f"ETCD_CERT={seen_as / 'etcd-discovery.pem'}",
        f"ETCD_KEY={seen_as / 'etcd-discovery.key'}",
        f"ETCD_USERNAME={DISCOVERY}",
        f"ETCD_PASSWORD_FILE={seen_as / 'etcd-discovery.password'}",
    ]


def discovery_client_env(directory: Path, endpoint: str) -> dict[str, str]:
    """The discovery user's settings for a client on the host (the demo), as environment."""
    client = tls(directory, DISCOVERY)
    return {
        "ETCD_ENDPOINT": endpoint,
        "ETCD_CACERT": client.ca,
        "ETCD_CERT": client.cert,
        "ETCD_KEY": client.key,
        "ETCD_USERNAME": DISCOVERY,
        "ETCD_PASSWORD_FILE": str(password_file(directory, DISCOVERY)),
    }
