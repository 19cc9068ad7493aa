"""Exec helper for lab nodes: join cgroups, make mounts, then exec the real command."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

JOURNALD_TIMEOUT = 5.0


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="fleetpy.lab._spawn")
    parser.add_argument("--cgroup-procs", action="append", default=[])
    parser.add_argument("--hostname", help="set in the (new) UTS namespace")
    parser.add_argument("--tmpfs", action="append", default=[])
    parser.add_argument("--mkdir", action="append", default=[])
    parser.add_argument("--bind", action="append", nargs=2, default=[], metavar=("SRC", "DST"))
    parser.add_argument("--journald", metavar="BINARY", help="start a private journald first")
    parser.add_argument("--journald-cgroup-procs", action="append", default=[])
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")

    # Join the cgroups before anything else, so every process the command
    # forks is born inside the node and a cgroup.kill reaches it.
    pid = str(os.getpid())
    for procs in args.cgroup_procs:
        with open(procs, "w") as f:
            f.write(pid)
    if args.hostname:
        socket.sethostname(args.hostname)
    for target in args.tmpfs:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", target], check=True)
    for path in args.mkdir:
        os.makedirs(path, mode=0o755, exist_ok=True)
    for src, dst in args.bind:
        subprocess.run(["mount", "--bind", src, dst], check=True)
    if args.journald:
        _start_journald(args.journald, args.journald_cgroup_procs)
    os.execvp(command[0], command)


def _start_journald(binary: str, cgroup_procs: list[str]) -> None:
    """Start journald on a private /run/log and wait for its stdout socket.

    It must listen before the manager starts, or units would log to nowhere. It stays
    a child of the exec'd command, which reaps it; it dies with the node's cgroup.
    """
    os.makedirs("/run/log", exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run/log"], check=True)
    os.makedirs("/run/log/journal", exist_ok=True)
    os.makedirs("/run/systemd/journal", exist_ok=True)
    argv = [sys.executable, __file__, *(a for p in cgroup_procs for a in ("--cgroup-procs", p)), "--", binary]
    journald = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + JOURNALD_TIMEOUT
    while not os.path.exists("/run/systemd/journal/stdout"):
        if journald.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"systemd-journald did not start (exit status {journald.returncode})")
        time.sleep(0.01)


if __name__ == "__main__":
    main(sys.argv[1:])
