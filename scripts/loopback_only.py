"""Run a command as on a new machine, in a private network namespace that has only loopback (``make test``).

1. Network: every server the tests start (Ray's GCS and raylets, MLflow, moto, gloo) then listens on
   127.0.0.1 and nothing outside this machine can reach it or be reached.
2. Files: a private mount namespace whose /tmp is a fresh, empty folder on disk (under /var/tmp, bind-mounted
   onto /tmp and removed afterwards), with HOME and the caches the tests use (XDG_*, ~/.ray, ~/.cache/hardneg)
   inside it. Nothing an earlier run left in /tmp (e.g. /tmp/ray) or in HOME is seen. The venv and pip's cache
   stay where they are, so a second run starts at once.

Both need root (or CAP_SYS_ADMIN) and ``unshare``; where either namespace cannot be made the command runs
without it and one line says so (HOME and the caches still point into a fresh folder).

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
import tempfile

_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
MARKER = "HARDNEG_LOOPBACK_NS"  # set inside the network namespace; tests read it to know where they run
FRESH_TMP = "HARDNEG_FRESH_TMP"  # set inside the mount namespace: the folder on disk that is now /tmp
PARENT = "/var/tmp"  # on disk (unlike a tmpfs /tmp) and outside the /tmp it replaces
# what an earlier run or the caller's environment would otherwise leak in
DROPPED = ("HARDNEG_CACHE_DIR", "HARDNEG_RAY_TMP", "RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "TORCH_HOME", "MPLCONFIGDIR")


def bring_loopback_up() -> None:
    """``ip link set lo up`` without iproute2: a fresh namespace starts with lo down."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s, _SIOCGIFFLAGS, request)[:18])[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | _IFF_UP))


def _why_not(*flags: str) -> str | None:
    """Why ``unshare FLAGS`` cannot make its namespace here, or None when it can."""
    if shutil.which("unshare") is None:
        return "unshare is not installed (util-linux)"
    if os.geteuid() != 0:
        return "not running as root"
    probe = subprocess.run(["unshare", *flags, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare {' '.join(flags)} failed: {(probe.stderr.strip().splitlines() or ['no message'])[-1]}"
    return None


def fresh_environ(environ: dict, tmp: str) -> dict:
    """``environ`` with HOME, the XDG folders and TMPDIR inside ``tmp``; pip's cache stays the caller's."""
    home = os.path.join(tmp, "home")
    caller_cache = environ.get("XDG_CACHE_HOME") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".cache"
    )
    env = {k: v for k, v in environ.items() if k not in DROPPED}
    env.update(
        HOME=home,
        XDG_CACHE_HOME=os.path.join(home, ".cache"),
        XDG_CONFIG_HOME=os.path.join(home, ".config"),
        XDG_DATA_HOME=os.path.join(home, ".local", "share"),
        PIP_CACHE_DIR=environ.get("PIP_CACHE_DIR") or os.path.join(caller_cache, "pip"),
        TMPDIR=tmp,
    )
    return env


def _inside(argv: list[str]) -> None:
    """In the namespaces: lo up, the fresh folder over /tmp, then the command (never returns)."""
    env = dict(os.environ)
    if env.get(MARKER) == "1":
        bring_loopback_up()
    fresh = env.pop(FRESH_TMP, None)
    if fresh:
        subprocess.run(["mount", "--bind", fresh, "/tmp"], check=True)  # private propagation: the host keeps its /tmp
        env = fresh_environ(env, "/tmp")
        os.makedirs(env["HOME"], exist_ok=True)
    os.execvpe(argv[0], argv, env)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    if os.environ.get(MARKER) == "1" or FRESH_TMP in os.environ:  # already inside
        _inside(argv)
    net = _why_not("-n")
    mnt = _why_not("-m", "--propagation", "private")
    if net is not None:
        print(f"note: tests run in the host network, not a loopback-only namespace: {net}", flush=True)
    fresh = tempfile.mkdtemp(prefix="hardneg-tests-", dir=PARENT if os.path.isdir(PARENT) else None)
    os.chmod(fresh, 0o1777)  # as /tmp is
    try:
        env, flags = dict(os.environ), []
        if net is None:
            env[MARKER] = "1"
            flags.append("-n")
        if mnt is None:
            env[FRESH_TMP] = fresh
            flags += ["-m", "--propagation", "private"]
        else:
            print(
                f"note: tests see the host's /tmp, not a fresh one (HOME and caches are in {fresh}): {mnt}", flush=True
            )
            env = fresh_environ(env, fresh)
            env["TMPDIR"] = os.environ.get("TMPDIR", "/tmp")  # tests keep Ray's socket paths short under /tmp
            os.makedirs(env["HOME"])
        command = ["unshare", *flags, sys.executable, os.path.abspath(__file__), *argv] if flags else argv
        try:
            return subprocess.run(command, env=env).returncode
        except KeyboardInterrupt:
            return 130
    finally:
        shutil.rmtree(fresh, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
