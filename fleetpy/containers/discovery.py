"""Service discovery sidekick: keep a key in etcd (v2 API) with a TTL while a service answers HTTP.

Run by units/web-discovery@.service. Standard library only, so any python3 on
a node can run it with fleetpy on its path.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_ETCD = "http://127.0.0.1:2379"
HTTP_TIMEOUT = 3.0
# While the service does not answer (typically: just started), check this often, so it is
# announced within a second of answering rather than one full interval later.
RETRY_INTERVAL = 1.0


def key_url(endpoint: str, key: str) -> str:
    return f"{endpoint.rstrip('/')}/v2/keys/{urllib.parse.quote(key.lstrip('/'))}"


def set_key(endpoint: str, key: str, value: str, ttl: int) -> None:
    body = urllib.parse.urlencode({"value": value, "ttl": str(ttl)}).encode()
    request = urllib.request.Request(key_url(endpoint, key), data=body, method="PUT")
    request.add_header("Content-Type", "application/x-www-form-urlencoded")
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT):
        pass


def remove_key(endpoint: str, key: str) -> None:
    request = urllib.request.Request(key_url(endpoint, key), method="DELETE")
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT):
            pass
    except urllib.error.HTTPError as err:
        # Already gone (expired or never written) is what we wanted.
        if err.code != 404:
            raise


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
            return 200 <= response.status < 400
    except (urllib.error.URLError, OSError):
        return False


def announce(endpoint: str, key: str, value: str, check_url: str, ttl: int, interval: float) -> None:
    """Refresh the key every interval while check_url answers; an unhealthy service lets it expire."""
    if interval >= ttl:
        raise SystemExit("--interval must be shorter than --ttl, or the key expires between refreshes")
    # systemd stops us with SIGTERM: leave the loop, ExecStopPost removes the key.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        announced = False
        if healthy(check_url):
            try:
                set_key(endpoint, key, value, ttl)
                announced = True
            except (urllib.error.URLError, OSError) as err:
                print(f"etcd {endpoint}: {err}", file=sys.stderr, flush=True)
        else:
            print(f"{check_url} does not answer; letting {key} expire", file=sys.stderr, flush=True)
        time.sleep(interval if announced else min(RETRY_INTERVAL, interval))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m fleetpy.containers.discovery")
    parser.add_argument(
        "--etcd", default=os.environ.get("ETCD_ENDPOINT", DEFAULT_ETCD), help="etcd v2 endpoint"
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
    args = parser.parse_args(argv)
    if args.action == "announce":
        announce(args.etcd, args.key, args.value, args.check_url, args.ttl, args.interval)
    else:
        remove_key(args.etcd, args.key)


if __name__ == "__main__":
    main()
