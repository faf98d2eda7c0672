"""torchrun / deepspeed-launcher entry point: every process runs one rank of ``rpg-dist train``.

    torchrun --nproc_per_node 2 -m rpg_dist.train.torchrun_main --config C [--set k=v ...]
    deepspeed --num_gpus 8 --module rpg_dist.train.torchrun_main --config C
    torchrun --nnodes 2 --node_rank R --master_addr HEAD --nproc_per_node 8 \\
        -m rpg_dist.train.torchrun_main --config C --set run_dir=s3://bucket/run

``train.launcher`` becomes "torchrun" and ``train.num_workers`` the launcher's WORLD_SIZE unless
set explicitly. Rank 0 prints the summary as JSON (and writes it to --summary-out if given).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rpg_dist.train.torchrun_main")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--summary-out", default=None, help="rank 0 writes the summary JSON here")
    # The deepspeed launcher passes --local_rank; LOCAL_RANK in the environment is what is used.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")

    from rpg_dist.config import load_config
    from rpg_dist.errors import RpgDistError
    from rpg_dist.train.stage import run_in_process

    keys = {o.split("=", 1)[0].strip() for o in args.overrides}
    defaults = ["train.launcher=torchrun"] if "train.launcher" not in keys else []
    if "train.num_workers" not in keys:
        defaults.append(f"train.num_workers={os.environ.get('WORLD_SIZE', '1')}")
    try:
        summary = run_in_process(load_config(args.config, defaults + args.overrides))
    except RpgDistError as err:
        print(f"rank {rank}: error: {err}", file=sys.stderr)
        return 2
    if rank == 0:
        text = json.dumps(summary, indent=2, sort_keys=True, default=str)
        print(text)
        if args.summary_out:
            from rpg_dist import io

            io.write_text(args.summary_out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
