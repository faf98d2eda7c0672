"""Run `rpg-dist` stages one by one as fresh processes: wall time and peak RSS of each process tree.

    python benchmarks/run_stages.py --json out.json -- \\
        "synth --like RUN --items 1000000 --users 1000000 --out DS" \\
        "tokenize --config configs/like1m.yaml" "train --config configs/like1m.yaml" ...

Each argument after ``--`` is one `rpg-dist` command line. The peak is the largest sum of RSS over
the command's process and all its descendants (a local Ray's raylet, GCS and workers included),
sampled every 0.5 s; it stops at the first failing command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import machine  # noqa: E402


def tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_stage(command: str, log_dir: str) -> dict:
    binary = os.path.join(os.path.dirname(sys.executable), "rpg-dist")
    name = command.split()[0]
    log_path = os.path.join(log_dir, f"{name}.log")
    start, peak = time.perf_counter(), 0
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([binary, *shlex.split(command)], stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.5)
    return {"command": command, "exit_code": proc.returncode, "wall_s": round(time.perf_counter() - start, 1),
            "peak_rss_gib": round(peak / 2**30, 2), "log": log_path}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="write the per-stage figures here")
    parser.add_argument("--logs", default=None, help="folder for each stage's output (default: next to --json)")
    parser.add_argument("commands", nargs="+", help="rpg-dist command lines, one per stage")
    args = parser.parse_args()
    log_dir = args.logs or os.path.dirname(os.path.abspath(args.json))
    os.makedirs(log_dir, exist_ok=True)
    results = {"machine": machine(), "stages": []}
    for command in args.commands:
        result = run_stage(command, log_dir)
        results["stages"].append(result)
        print(json.dumps(result), flush=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        if result["exit_code"]:
            sys.exit(result["exit_code"])


if __name__ == "__main__":
    main()
