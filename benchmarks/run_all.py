"""Run every speed/size benchmark (`make bench`): inference (onnxruntime, OpenVINO), attack and training throughput.

    python benchmarks/run_all.py [--quick] [--only inference,openvino,attack,train]

Each script runs in its own Python process (so torch / onnxruntime thread settings of one never
leak into the next), prints its table, and rewrites its own section of BENCHMARKS.md and its key
of benchmarks/results.json. Exit status: non-zero only when a script failed with an error; a slow
figure is reported, never failed. `--quick` is a short smoke run (its figures say so).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = {"inference": "inference.py", "openvino": "openvino_speed.py", "exactness": "exactness.py",
           "attack": "attack_speed.py",
           "train": "train_speed.py"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run of every script")
    ap.add_argument("--only", default=",".join(SCRIPTS), help=f"comma list of: {', '.join(SCRIPTS)}")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md and results.json alone")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(SCRIPTS)}")
    failed = []
    t_all = time.perf_counter()
    for name in names:
        cmd = [sys.executable, str(HERE / SCRIPTS[name])]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--no-write"] if args.no_write else []
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        rc = subprocess.run(cmd, check=False).returncode
        print(f"=== {name}: exit {rc} after {time.perf_counter() - t:.0f} s", flush=True)
        if rc != 0:
            failed.append(f"{name} (exit {rc})")
    print(f"\nall benchmarks: {time.perf_counter() - t_all:.0f} s")
    results = HERE / "results.json"
    if results.exists() and not args.no_write:
        data = json.loads(results.read_text())
        lines = list((data.get("inference") or {}).get("goals", {}).get("lines", []))
        for key in ("train",):
            if (data.get(key) or {}).get("goal"):
                lines.append(data[key]["goal"])
        if lines:
            print("goals (reported, not asserted):")
            for line in lines:
                print("  " + line)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
