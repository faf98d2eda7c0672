"""Run `rpg-dist` stages one by one as fresh processes: wall time and peak RSS of each process tree.

    python benchmarks/run_stages.py --json out.json -- \\
        "synth --like RUN --items 1000000 --users 1000000 --out DS" \\
        "tokenize --config configs/like1m.yaml" "train --config configs/like1m.yaml" ...

Each argument after ``--`` is one `rpg-dist` command line. The peak is the largest sum of RSS over
the command's process and all its descendants (a local Ray's raylet, GCS and workers included),
sampled every 0.5 s; a page several processes map (Ray's object store, a graph build's lists in
shared memory) counts once per process there. ``peak_pss_gib`` (sampled every 5 s) sums
proportional set sizes instead: each page once, the memory the tree takes. It stops at the first
failing command.
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


def tree_memory(pid: int, with_pss: bool) -> tuple[int, int]:
    """(RSS, PSS) in bytes summed over ``pid`` and its descendants; PSS 0 unless ``with_pss``."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    rss = pss = 0
    for proc in procs:
        try:
            rss += proc.memory_info().rss
        except psutil.Error:
            pass
        if with_pss:
            pss += _pss(proc.pid)
    return rss, pss


def _pss(pid: int) -> int:
    """A process's proportional set size (a page shared by n processes counts 1/n), 0 where unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_stage(command: str, log_dir: str) -> dict:
    binary = os.path.join(os.path.dirname(sys.executable), "rpg-dist")
    name = command.split()[0]
    log_path = os.path.join(log_dir, f"{name}.log")
    start, peak_rss, peak_pss, samples = time.perf_counter(), 0, 0, 0
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([binary, *shlex.split(command)], stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            # PSS every 10th sample: reading it walks the page tables (milliseconds for GBs).
            rss, pss = tree_memory(proc.pid, with_pss=samples % 10 == 0)
            peak_rss, peak_pss, samples = max(peak_rss, rss), max(peak_pss, pss), samples + 1
            time.sleep(0.5)
    return {"command": command, "exit_code": proc.returncode, "wall_s": round(time.perf_counter() - start, 1),
            "peak_rss_gib": round(peak_rss / 2**30, 2), "peak_pss_gib": round(peak_pss / 2**30, 2), "log": log_path}


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
