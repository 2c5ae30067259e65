"""`hardneg bench all`: every benchmark in one run, a JSON report and a printed table.

Loss kernels, loader throughput (WebDataset, FFCV, in-memory baseline), training throughput (plain
process vs Ray Train) and the step breakdown (data wait, loss, gather). Each section keeps the text
its benchmark printed; the step breakdown is also stored as numbers. The report names the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
import traceback

import torch

from data_prep.atomic import write_json_atomic
from pipeline.app.bench import run_bench
from pipeline.app.bench.step import machine, print_table
from pipeline.app.bench.step import run as run_step

# Sub-benchmark arguments: (full size, --quick) — quick keeps CI and a 2-core CPU in minutes.
ARGS = {
    "losses": ([], ["--quick"]),
    "prep": ([], ["--quick"]),
    "train": ([], ["--quick"]),
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hardneg bench all", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_report.json", help="JSON report (default bench_report.json)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for CPU and CI")
    parser.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join([*ARGS, "step"]))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    only = [s for s in args.only.split(",") if s] or [*ARGS, "step"]
    unknown = sorted(set(only) - set(ARGS) - {"step"})
    if unknown:
        parser.error(f"--only: unknown section(s) {unknown}")
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "quick": args.quick,
        "machine": machine(torch.device(args.device)),
        "sections": {},
    }
    failed = []
    for name in only:
        start = time.perf_counter()
        if name == "step":
            steps = ["--steps", "3", "--warmup", "1"] if args.quick else ["--steps", "20", "--warmup", "3"]
            overrides = [] if args.quick else ["augment.image_size=32", "model.width=64", "train.global_batch_size=256"]
            try:
                result = run_step("configs/demo.yaml", overrides, int(steps[1]), int(steps[3]), args.device)
                print_table(result)
                report["sections"]["step"] = result
            except Exception:  # noqa: BLE001 -- one broken section must not lose the others' figures
                failed.append(name)
                report["sections"]["step"] = {"error": traceback.format_exc(limit=3)}
            continue
        sub_argv = ARGS[name][1] if args.quick else ARGS[name][0]
        buffer = io.StringIO()
        try:
            with contextlib.redirect_stdout(buffer):
                code = run_bench(name, sub_argv)
        except Exception:  # noqa: BLE001 -- one broken bench must not lose the others' figures
            code, buffer = 1, io.StringIO(buffer.getvalue() + traceback.format_exc(limit=3))
        text = buffer.getvalue()
        print(f"== bench {name} {' '.join(sub_argv)} ({time.perf_counter() - start:.0f} s)\n{text}")
        report["sections"][name] = {
            "argv": sub_argv,
            "exit_code": code,
            "output": text,
            "seconds": round(time.perf_counter() - start, 1),
        }
        if code:
            failed.append(name)
    write_json_atomic(args.out, report, indent=2)
    print(f"report written to {args.out}" + (f"; failed sections: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
