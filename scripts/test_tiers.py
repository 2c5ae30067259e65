"""The suite's two tiers, as `make test` and `make test-fast` run them (inside scripts/loopback_only.py).

    fast   everything that starts no Ray, no server and no browser and takes no minutes of CPU: the inner loop
    rest   the tests marked ray, server, browser or slow

`all` runs fast, then rest (both, even when fast fails), and prints each tier's wall time and the 25 slowest
tests of the two (setup + call + teardown); both print the fast tier's 10 slowest. Extra arguments go to pytest.

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
SLOWEST = 25
FAST_SLOWEST = 10  # the fast tier has a budget of its own (4 min on 2 cores): what to look at first


def _children_cpu() -> float:
    """User + system CPU seconds of the finished child processes (pytest and what it waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_tier(name: str, extra: list[str], junit: str) -> tuple[int, float]:
    """pytest on one tier; its exit status and wall time."""
    print(f"=== tier {name}: pytest -m '{TIERS[name]}'", flush=True)
    start, cpu = time.monotonic(), _children_cpu()
    argv = [sys.executable, "-m", "pytest", "-q", "-m", TIERS[name], f"--junitxml={junit}", *extra]
    rc = subprocess.run(argv).returncode
    wall, cpu = time.monotonic() - start, _children_cpu() - cpu
    # CPU seconds say what the tier costs when the machine is shared (wall time then mostly measures the others)
    print(f"=== tier {name}: exit {rc}, {wall:.0f} s wall ({wall / 60:.1f} min), {cpu:.0f} s CPU", flush=True)
    return rc, wall


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
