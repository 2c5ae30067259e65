"""The suite's two tiers, as `make test` and `make test-fast` run them (inside scripts/loopback_only.py).

    fast   everything that starts no Ray, no server and no browser and takes no minutes of CPU: the inner loop
    rest   the tests marked ray, server, browser or slow

`all` runs fast, then rest (both, even when fast fails), and prints each tier's wall time and the 25 slowest
tests of the two (setup + call + teardown); both print the fast tier's 10 slowest. Extra arguments go to pytest.

The rest tier is two pytest processes at once: the tests that start Ray, and the others (servers, the browser,
CLI trainings). Much of its time is waiting (a Ray start-up, a server's first answer, a job's status poll), not
CPU, so the two halves overlap on 2 cores. Only the first starts Ray (the conftest guard fails any other test
that does), so the two never share Ray's state in HOME. Its output comes live; the other's follows when it ends.
HARDNEG_TEST_JOBS=1 runs the rest tier as one process instead.

usage: python scripts/test_tiers.py {fast,all} [PYTEST_ARG ...]
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

REST = "ray or server or browser or slow"
TIERS = {"fast": f"not ({REST})", "rest": REST}
# the rest tier's two halves, run side by side (their union is REST)
HALVES = {"rest/ray": "ray", "rest/other": f"({REST}) and not ray"}
SLOWEST = 25
FAST_SLOWEST = 10  # the fast tier has a budget of its own (4 min on 2 cores): what to look at first


def _children_cpu() -> float:
    """User + system CPU seconds of the finished child processes (pytest and what it waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _pytest(marker: str, extra: list[str], junit: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-m", marker, f"--junitxml={junit}", *extra]


def run_tier(name: str, extra: list[str], junit: str) -> tuple[int, float]:
    """pytest on one tier; its exit status and wall time."""
    print(f"=== tier {name}: pytest -m '{TIERS[name]}'", flush=True)
    start, cpu = time.monotonic(), _children_cpu()
    rc = subprocess.run(_pytest(TIERS[name], extra, junit)).returncode
    wall, cpu = time.monotonic() - start, _children_cpu() - cpu
    # CPU seconds say what the tier costs when the machine is shared (wall time then mostly measures the others)
    print(f"=== tier {name}: exit {rc}, {wall:.0f} s wall ({wall / 60:.1f} min), {cpu:.0f} s CPU", flush=True)
    return rc, wall


def run_halves(extra: list[str], out: str) -> tuple[int, float, list[str]]:
    """The rest tier as its two halves at once: exit status (the worse), wall time, and the JUnit reports."""
    print(f"=== tier rest: pytest -m '{TIERS['rest']}', as two processes at once: " + ", ".join(HALVES), flush=True)
    start, cpu = time.monotonic(), _children_cpu()
    (live, live_marker), (quiet, quiet_marker) = HALVES.items()
    junits = [os.path.join(out, f"{name.replace('/', '-')}.xml") for name in HALVES]
    log_path = os.path.join(out, "rest-other.log")
    with open(log_path, "w") as log:
        background = subprocess.Popen(_pytest(quiet_marker, extra, junits[1]), stdout=log, stderr=subprocess.STDOUT)
        try:
            print(f"=== {live}: pytest -m '{live_marker}' (its output follows)", flush=True)
            rcs = {live: subprocess.run(_pytest(live_marker, extra, junits[0])).returncode}
            rcs[quiet] = background.wait()
        finally:
            if background.poll() is None:  # Ctrl-C: take the other half down too
                background.terminate()
                background.wait()
    print(f"\n=== {quiet}: pytest -m '{quiet_marker}' (its output, which ran meanwhile)", flush=True)
    with open(log_path) as log:
        sys.stdout.write(log.read())
    wall, cpu = time.monotonic() - start, _children_cpu() - cpu
    for name, rc in rcs.items():
        print(f"=== {name}: exit {rc}", flush=True)
    # 5 (no tests collected) is a pass for a half that happens to be empty under -k
    rc = max((0 if rc == 5 else rc) for rc in rcs.values())
    rc = 5 if all(r == 5 for r in rcs.values()) else rc
    print(f"=== tier rest: exit {rc}, {wall:.0f} s wall ({wall / 60:.1f} min), {cpu:.0f} s CPU", flush=True)
    return rc, wall, junits


def durations(junit: str) -> list[tuple[float, str]]:
    """(seconds, test id) of every test case in a JUnit report (time = setup + call + teardown)."""
    if not os.path.exists(junit):
        return []
    cases = ET.parse(junit).getroot().iter("testcase")
    return [(float(c.get("time", 0)), f"{c.get('classname', '').replace('.', '/')}.py::{c.get('name')}") for c in cases]


def print_slowest(title: str, times: list[tuple[float, str]], n: int) -> None:
    print(f"\n=== {title} (setup + call + teardown)")
    for seconds, test in sorted(times, reverse=True)[:n]:
        print(f"{seconds:8.1f} s  {test}")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("fast", "all"):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    which, extra = argv[0], argv[1:]
    names = ["fast"] if which == "fast" else ["fast", "rest"]
    results, times = {}, {}
    with tempfile.TemporaryDirectory(prefix="hardneg-tiers-") as out:
        for name in names:
            if name == "rest" and os.environ.get("HARDNEG_TEST_JOBS", "2") != "1":
                rc, wall, junits = run_halves(extra, out)
                results[name] = rc, wall
                times[name] = [t for junit in junits for t in durations(junit)]
                continue
            junit = os.path.join(out, f"{name}.xml")
            results[name] = run_tier(name, extra, junit)
            times[name] = durations(junit)
    print_slowest(f"the {FAST_SLOWEST} slowest tests of tier fast", times["fast"], FAST_SLOWEST)
    if which == "all":
        print_slowest(f"the {SLOWEST} slowest tests", [t for tier in times.values() for t in tier], SLOWEST)
    print()
    for name, (rc, wall) in results.items():
        print(
            f"=== tier {name}: {'passed' if rc in (0, 5) else f'FAILED (exit {rc})'} in {wall:.0f} s ({wall / 60:.1f} min)"
        )
    total = sum(wall for _, wall in results.values())
    if len(results) > 1:
        print(f"=== pytest in all: {total:.0f} s ({total / 60:.1f} min)")
    # 5 (no tests collected) is a pass for a tier that happens to be empty under -k
    return max((0 if rc == 5 else rc) for rc, _ in results.values())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
