"""Run a command inside a private network namespace that has only loopback (``make test`` uses it).

Every server the tests start (Ray's GCS and raylets, MLflow, moto, gloo) then listens on 127.0.0.1
and nothing outside this machine can reach it or be reached. Needs root (or CAP_SYS_ADMIN) and
``unshare``; where either is missing the command runs as it is and one line says so.

usage: python scripts/loopback_only.py COMMAND [ARG ...]
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import struct
import subprocess
import sys

_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
MARKER = "HARDNEG_LOOPBACK_NS"  # set inside the namespace; tests read it to know where they run


def bring_loopback_up() -> None:
    """``ip link set lo up`` without iproute2: a fresh namespace starts with lo down."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s, _SIOCGIFFLAGS, request)[:18])[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | _IFF_UP))


def _why_not() -> str | None:
    """Why a namespace cannot be made here, or None when it can."""
    if shutil.which("unshare") is None:
        return "unshare is not installed (util-linux)"
    if os.geteuid() != 0:
        return "not running as root"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare -n failed: {(probe.stderr.strip().splitlines() or ['no message'])[-1]}"
    return None


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    if os.environ.get(MARKER) == "1":  # already inside: set lo up and run the command
        bring_loopback_up()
        os.execvp(argv[0], argv)
    reason = _why_not()
    if reason is not None:
        print(f"note: tests run in the host network, not a loopback-only namespace: {reason}", flush=True)
        os.execvp(argv[0], argv)
    env = dict(os.environ, **{MARKER: "1"})
    os.execvpe("unshare", ["unshare", "-n", sys.executable, os.path.abspath(__file__), *argv], env)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
