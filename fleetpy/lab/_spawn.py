"""Exec helper for lab nodes: join cgroups, make mounts, then exec the real command."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="fleetpy.lab._spawn")
    parser.add_argument("--cgroup-procs", action="append", default=[])
    parser.add_argument("--hostname", help="set in the (new) UTS namespace")
    parser.add_argument("--tmpfs", action="append", default=[])
    parser.add_argument("--mkdir", action="append", default=[])
    parser.add_argument("--bind", action="append", nargs=2, default=[], metavar=("SRC", "DST"))
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
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
