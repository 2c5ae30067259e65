"""The suite's two tiers, as `make test` and `make test-fast` run them (inside scripts/loopback_only.py).

    fast   everything that starts no Ray, no server and no browser and takes no minutes of CPU: the inner loop
    rest   the tests marked ray, server, browser or slow

`all` runs fast, then rest (both, even when fast fails), and prints each tier's wall time and the 25 slowest
tests of the two (setup + call + teardown). Extra arguments go to pytest.

usage: python scripts/test_tiers.py {fast,all} [PYTEST_ARG ...]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

FAST = "not (ray or server or browser or slow)"
TIERS = {"fast": FAST, "rest": f"not ({FAST})"}
SLOWEST = 25


def run_tier(name: str, extra: list[str], junit: str) -> tuple[int, float]:
    """pytest on one tier; its exit status and wall time."""
    print(f"=== tier {name}: pytest -m '{TIERS[name]}'", flush=True)
    start = time.monotonic()
    argv = [sys.executable, "-m", "pytest", "-q", "-m", TIERS[name], f"--junitxml={junit}", *extra]
    rc = subprocess.run(argv).returncode
    wall = time.monotonic() - start
    print(f"=== tier {name}: exit {rc}, {wall:.0f} s wall ({wall / 60:.1f} min)", flush=True)
    return rc, wall


def durations(junit: str) -> list[tuple[float, str]]:
    """(seconds, test id) of every test case in a JUnit report (time = setup + call + teardown)."""
    if not os.path.exists(junit):
        return []
    cases = ET.parse(junit).getroot().iter("testcase")
    return [(float(c.get("time", 0)), f"{c.get('classname', '').replace('.', '/')}.py::{c.get('name')}") for c in cases]


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("fast", "all"):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    which, extra = argv[0], argv[1:]
    names = ["fast"] if which == "fast" else ["fast", "rest"]
    results, times = {}, []
    with tempfile.TemporaryDirectory(prefix="hardneg-tiers-") as out:
        for name in names:
            junit = os.path.join(out, f"{name}.xml")
            results[name] = run_tier(name, extra, junit)
            times += durations(junit)
    if which == "all":
        print(f"\n=== the {SLOWEST} slowest tests (setup + call + teardown)")
        for seconds, test in sorted(times, reverse=True)[:SLOWEST]:
            print(f"{seconds:8.1f} s  {test}")
    print()
    for name, (rc, wall) in results.items():
        print(
            f"=== tier {name}: {'passed' if rc == 0 else f'FAILED (exit {rc})'} in {wall:.0f} s ({wall / 60:.1f} min)"
        )
    total = sum(wall for _, wall in results.values())
    if len(results) > 1:
        print(f"=== pytest in all: {total:.0f} s ({total / 60:.1f} min)")
    # 5 (no tests collected) is a pass for a tier that happens to be empty under -k
    return max((0 if rc == 5 else rc) for rc, _ in results.values())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
