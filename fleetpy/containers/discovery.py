"""Service discovery sidekick: keep a key in etcd (v3 API) on a lease while a service answers HTTP.

Run by units/web-discovery@.service. Standard library only, so any python3 on a node can run
it with fleetpy on its path: it speaks etcd's v3 JSON gateway (`/v3/...`, etcd 3.4 and later),
which needs no v2 API and no gRPC. Where etcd wants them, it shows a client certificate (TLS)
and logs in with a user and a password read from a file; no secret is ever on a command line.

Settings come from the environment (the unit reads /etc/fleetpy/discovery.env):
ETCD_ENDPOINT, ETCD_CACERT, ETCD_CERT, ETCD_KEY, ETCD_USERNAME, ETCD_PASSWORD_FILE.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_ETCD = "http://127.0.0.1:2379"
HTTP_TIMEOUT = 3.0
# While the service does not answer (typically: just started), check this often, so it is
# announced within a second of answering rather than one full interval later.
RETRY_INTERVAL = 1.0


class EtcdError(Exception):
    """etcd refused a request or could not be reached; the message says which."""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _text(b64: str) -> str:
    return base64.b64decode(b64).decode()


def _range_end(prefix: str) -> str:
    """etcd's end of a prefix range: the prefix with its last byte incremented."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode()


@dataclass
class Etcd:
    """One etcd endpoint, over its v3 JSON gateway, with optional TLS and password login."""

    endpoint: str = DEFAULT_ETCD
    cacert: str | None = None
    cert: str | None = None
    key: str | None = None
    username: str | None = None
    password_file: str | None = None
    _token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Etcd:
        def get(name: str) -> str | None:
            return environ.get(name) or None

        return cls(
            endpoint=get("ETCD_ENDPOINT") or DEFAULT_ETCD,
            cacert=get("ETCD_CACERT"),
            cert=get("ETCD_CERT"),
            key=get("ETCD_KEY"),
            username=get("ETCD_USERNAME"),
            password_file=get("ETCD_PASSWORD_FILE"),
        )

    def _context(self) -> ssl.SSLContext | None:
        if not self.endpoint.startswith("https:"):
            return None
        context = ssl.create_default_context(cafile=self.cacert)
        if self.cert:
            context.load_cert_chain(self.cert, self.key)
        return context

    def _post(self, path: str, body: dict, token: str | None) -> dict:
        request = urllib.request.Request(
            f"{self.endpoint.rstrip('/')}/v3/{path}", data=json.dumps(body).encode(), method="POST"
        )
        request.add_header("Content-Type", "application/json")
        if token:
            request.add_header("Authorization", token)
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT, context=self._context()) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            raise EtcdError(f"etcd {self.endpoint} refused {path}: {_message(error)}") from None
        except (urllib.error.URLError, OSError) as error:
            raise EtcdError(f"etcd {self.endpoint} unreachable: {error}") from None

    def _login(self) -> str | None:
        if not self.username:
            return None
        if not self.password_file:
            raise EtcdError("ETCD_USERNAME is set without ETCD_PASSWORD_FILE")
        with open(self.password_file) as file:
            password = file.read().strip()
        return self._post("auth/authenticate", {"name": self.username, "password": password}, None)["token"]

    def call(self, path: str, body: dict) -> dict:
        """One request; logs in first if needed, and once more if etcd says the token expired."""
        if self.username and self._token is None:
            self._token = self._login()
        try:
            return self._post(path, body, self._token)
        except EtcdError as error:
            if not self.username or "token" not in str(error):
                raise
            self._token = self._login()  # simple tokens expire after --auth-token-ttl unused
            return self._post(path, body, self._token)

    # -- what the sidekick and the demo need ---------------------------------------------
    def grant(self, ttl: int) -> str:
        return self.call("lease/grant", {"TTL": str(ttl)})["ID"]

    def keepalive(self, lease: str) -> bool:
        """Whether the lease still lives (and now has its full TTL again)."""
        result = self.call("lease/keepalive", {"ID": lease}).get("result", {})
        return int(result.get("TTL", 0)) > 0

    def put(self, key: str, value: str, lease: str | None = None) -> None:
        body = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = lease
        self.call("kv/put", body)

    def delete(self, key: str) -> None:
        self.call("kv/deleterange", {"key": _b64(key)})

    def list(self, prefix: str) -> dict[str, tuple[str, int]]:
        """key -> (value, seconds its lease has left, or -1 without one) for keys under `prefix`."""
        reply = self.call("kv/range", {"key": _b64(prefix), "range_end": _range_end(prefix)})
        found = {}
        for kv in reply.get("kvs", []):
            ttl = -1
            if kv.get("lease"):
                ttl = int(self.call("lease/timetolive", {"ID": kv["lease"]}).get("TTL", -1))
            found[_text(kv["key"])] = (_text(kv.get("value", "")), ttl)
        return found


def _message(error: urllib.error.HTTPError) -> str:
    raw = b""
    try:
        raw = error.read()
        body = json.loads(raw)
        return str(body.get("error") or body.get("message") or body)
    except (ValueError, OSError):
        return f"HTTP {error.code} {raw[:200]!r}"


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
            return 200 <= response.status < 400
    except (urllib.error.URLError, OSError):
        return False


class Announcer:
    """The key, on a lease of `ttl` seconds that each healthy round keeps alive."""

    def __init__(self, etcd: Etcd, key: str, value: str, ttl: int):
        self.etcd, self.key, self.value, self.ttl = etcd, key, value, ttl
        self.lease: str | None = None

    def announce(self) -> None:
        if self.lease is None or not self.etcd.keepalive(self.lease):
            # First round, or the lease ran out (etcd away longer than the TTL): a new one.
            self.lease = self.etcd.grant(self.ttl)
        # Written every round, so a key deleted by hand comes back.
        self.etcd.put(self.key, self.value, self.lease)


def announce(etcd: Etcd, key: str, value: str, check_url: str, ttl: int, interval: float) -> None:
    """Keep the key alive every interval while check_url answers; an unhealthy service lets it expire."""
    if interval >= ttl:
        raise SystemExit("--interval must be shorter than --ttl, or the key expires between refreshes")
    # systemd stops us with SIGTERM: leave the loop, ExecStopPost removes the key.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    announcer = Announcer(etcd, key, value, ttl)
    while True:
        announced = False
        if healthy(check_url):
            try:
                announcer.announce()
                announced = True
            except EtcdError as err:
                print(err, file=sys.stderr, flush=True)
        else:
            print(f"{check_url} does not answer; letting {key} expire", file=sys.stderr, flush=True)
        time.sleep(interval if announced else min(RETRY_INTERVAL, interval))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python3 -m fleetpy.containers.discovery",
        epilog="etcd settings come from ETCD_ENDPOINT, ETCD_CACERT, ETCD_CERT, ETCD_KEY, "
        "ETCD_USERNAME and ETCD_PASSWORD_FILE",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("announce")
    up.add_argument("--key", required=True)
    up.add_argument("--value", required=True)
    up.add_argument("--check-url", required=True)
    up.add_argument("--ttl", type=int, default=30)
    up.add_argument("--interval", type=float, default=10.0)
    down = sub.add_parser("remove")
    down.add_argument("--key", required=True)
    show = sub.add_parser("list", help="keys under a prefix, with their values and TTLs")
    show.add_argument("--prefix", required=True)
    args = parser.parse_args(argv)
    etcd = Etcd.from_env(os.environ)
    try:
        if args.action == "announce":
            announce(etcd, args.key, args.value, args.check_url, args.ttl, args.interval)
        elif args.action == "remove":
            etcd.delete(args.key)  # deleting a key that is gone is no error in v3
        else:
            for key, (value, ttl) in sorted(etcd.list(args.prefix).items()):
                print(f"{key} {value} {ttl}")
    except EtcdError as error:
        raise SystemExit(str(error)) from None


if __name__ == "__main__":
    main()
