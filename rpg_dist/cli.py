"""``rpg-dist`` command line: parse, build, run, close. Stage logic lives in the stage modules."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from rpg_dist.errors import RpgDistError

STAGES = ("prepare", "tokenize", "train", "build-graph", "evaluate")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args) or 0)
    except RpgDistError as err:
        print(f"rpg-dist {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rpg-dist {args.command}: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rpg-dist",
        description="Train and serve RPG (long parallel semantic IDs) on Ray + DeepSpeed.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="import raw data into the dataset format")
    p.add_argument("--format", required=True, choices=["s3rec", "amazon2014", "interactions"])
    p.add_argument("--input", required=True, help="s3rec/amazon2014: a folder; interactions: the interactions file")
    p.add_argument("--out", required=True, help="dataset URI to create (local, s3://, gs://, memory://)")
    p.add_argument("--category", default="", help="amazon2014: category name, e.g. Beauty")
    p.add_argument("--items", default="", help="interactions: items table (CSV or parquet)")
    p.add_argument("--user-col", default="user_id", help="interactions: user column")
    p.add_argument("--item-col", default="item_id", help="interactions: item column")
    p.add_argument("--time-col", default="timestamp", help="interactions: timestamp column")
    p.add_argument("--item-id-col", default="item_id", help="interactions: id column of the items table")
    p.add_argument("--text-cols", default="title", help="interactions: comma-separated item text columns")
    _add_storage_args(p)
    p.set_defaults(handler=_prepare)

    p = sub.add_parser("synth", help="generate a synthetic catalogue (taxonomy, or fitted on a real run)")
    p.add_argument("--items", type=_positive_int, required=True, help="number of items")
    p.add_argument("--users", type=_positive_int, required=True, help="number of users")
    p.add_argument("--out", required=True, help="dataset URI to create")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--like", metavar="RUN_DIR", default=None,
                   help="fit item vectors and user transitions on this tokenized run (realistic codes); "
                        "items get an `embedding` column for tokenize.embeddings=items")
    p.add_argument("--components", type=int, default=None, help="--like: mixture components (default n/4)")
    _add_storage_args(p)
    p.set_defaults(handler=_synth)

    for name, helptext, handler in (
        ("tokenize", "embed item texts and build OPQ semantic IDs (Ray)", _tokenize),
        ("train", "train the RPG model with DeepSpeed (Ray Train or torchrun)", _train),
        ("build-graph", "build and partition the item kNN graph (Ray)", _build_graph),
        ("evaluate", "leave-one-out evaluation with graph decoding and full ranking", _evaluate),
        ("run", "run every stage in order, skipping complete ones", _run),
    ):
        p = sub.add_parser(name, help=helptext)
        _add_config_args(p)
        if name == "tokenize":
            p.add_argument("--add", metavar="NEW_ITEMS_URI", help="encode new items with the trained OPQ")
        if name == "run":
            p.add_argument("--force", action="append", default=[], choices=STAGES, metavar="STAGE",
                           help=f"redo this stage even if complete (one of {', '.join(STAGES)})")
        p.set_defaults(handler=handler)

    p = sub.add_parser("recommend", help="top-k items for item histories from a trained run")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--history", required=True, action="append", help="comma-separated item ids (repeatable)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--method", choices=["auto", "graph", "full"],
                   help="graph decoding, full ranking (every item scored) or auto by catalogue size "
                        "(default: the run's decode.method)")
    _add_storage_args(p)
    p.set_defaults(handler=_recommend)

    p = sub.add_parser("add-items", help="add items to a trained run's catalogue (no retraining)")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--items", required=True, help="parquet file or folder: item_id, text (or embedding), title")
    _add_storage_args(p)
    p.set_defaults(handler=_add_items)

    p = sub.add_parser("withdraw-items", help="take items out of a trained run's catalogue")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--ids", required=True, help="comma-separated item ids")
    _add_storage_args(p)
    p.set_defaults(handler=_withdraw_items)

    p = sub.add_parser("serve", help="serve a trained run over HTTP (Ray Serve)")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    p.add_argument("--replicas", type=_positive_int, default=None, help="replicas of the service (default 1)")
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local Ray)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a serve setting, e.g. --set max_batch_size=32 (repeatable)")
    p.set_defaults(handler=_serve)

    p = sub.add_parser("submit", help="submit a run to a Ray cluster as a Ray job")
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    _add_config_args(p)
    p.add_argument("--wait", action="store_true", help="stream logs; exit with the job's status")
    p.add_argument("--command", dest="job_command", default="run", choices=["run", *STAGES[1:]],
                   help="rpg-dist command the job runs (default: run)")
    p.set_defaults(handler=_submit)
    return parser


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config (path or URI)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=0.001 (repeatable)")


def _add_storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", default=None,
                   help="S3-compatible endpoint (else AWS_ENDPOINT_URL); credentials from the environment")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")


def _storage(args: argparse.Namespace):
    from rpg_dist.config import StorageConfig

    return StorageConfig(endpoint_url=args.endpoint_url)


def _config(args: argparse.Namespace):
    from rpg_dist.config import load_config, with_absolute_paths

    return with_absolute_paths(load_config(args.config, args.overrides))


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _prepare(args: argparse.Namespace) -> int:
    from rpg_dist.data.config import InteractionsColumns, PrepareConfig
    from rpg_dist.data.importers import prepare

    columns = InteractionsColumns(
        user=args.user_col, item=args.item_col, timestamp=args.time_col,
        item_id=args.item_id_col, text=[c for c in args.text_cols.split(",") if c],
    )
    cfg = PrepareConfig(format=args.format, input=args.input, category=args.category,
                        items=args.items, columns=columns)
    info = prepare(cfg, args.out, _storage(args), overwrite=args.overwrite)
    _print_json(info.__dict__)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _synth(args: argparse.Namespace) -> int:
    from rpg_dist.data import importers, realistic, synth

    if args.like:
        model = realistic.fit_run(args.like, _storage(args), args.components, args.seed)
        info = realistic.write_catalogue(model, args.items, args.users, args.out, _storage(args), args.seed,
                                         overwrite=args.overwrite)
    else:
        raw = synth.generate(n_items=args.items, n_users=args.users, seed=args.seed)
        info = importers.write(raw, args.out, source="synth", storage=_storage(args), overwrite=args.overwrite)
    _print_json(info.__dict__)
    return 0


def _stage(fn: Callable) -> Callable[[argparse.Namespace], int]:
    """Load the config first (bad configs fail fast, before heavy imports), then run the stage."""

    def handler(args: argparse.Namespace) -> int:
        from rpg_dist.config import save_run_config
        from rpg_dist.runlock import run_dir_lock

        cfg = _config(args)
        with run_dir_lock(cfg.run_dir):
            save_run_config(cfg)
            result = fn(cfg, args)
        if result is not None:
            _print_json(result)
        return 0

    return handler


@_stage
def _tokenize(cfg, args: argparse.Namespace):
    from rpg_dist.tokenizer.stage import tokenize

    return tokenize(cfg, add=args.add)


@_stage
def _train(cfg, args: argparse.Namespace):
    from rpg_dist.train.stage import train

    return train(cfg)


@_stage
def _build_graph(cfg, args: argparse.Namespace):
    from rpg_dist.graph.stage import build_graph

    return build_graph(cfg)


@_stage
def _evaluate(cfg, args: argparse.Namespace):
    from rpg_dist.evaluation.stage import evaluate

    return evaluate(cfg)


def _run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from rpg_dist.pipeline import run_pipeline
    from rpg_dist.runlock import run_dir_lock

    with run_dir_lock(cfg.run_dir):
        run_pipeline(cfg, force=args.force)
    return 0


def _recommend(args: argparse.Namespace) -> int:
    from rpg_dist.recommend import Recommender, parse_history, print_recommendations

    recommender = Recommender.load(args.run, _storage(args), method=args.method)
    histories = [parse_history(h) for h in args.history]
    results = recommender.recommend(histories, k=args.k)
    print_recommendations(histories, results)
    return 0


def _add_items(args: argparse.Namespace) -> int:
    from rpg_dist import catalogue
    from rpg_dist.recommend import Recommender

    recommender = Recommender.load(args.run, _storage(args))
    change = catalogue.read_new_items(args.items, catalogue.ItemEncoder(args.run, _storage(args)), _storage(args))
    version = catalogue.change_and_commit(recommender, args.run, change, recommender.version, _storage(args))
    _print_json({"added": len(change.item_ids), "version": version, "n_items": len(recommender.index)})
    return 0


def _withdraw_items(args: argparse.Namespace) -> int:
    from rpg_dist import catalogue
    from rpg_dist.data.items import as_item_ids
    from rpg_dist.recommend import Recommender, parse_history

    ids = as_item_ids(parse_history(args.ids, "--ids"), "--ids")
    recommender = Recommender.load(args.run, _storage(args))
    change = catalogue.Change("withdraw", ids)
    version = catalogue.change_and_commit(recommender, args.run, change, recommender.version, _storage(args))
    _print_json({"withdrawn": int(recommender.withdrawn.sum()), "version": version})
    return 0


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from rpg_dist import configlib
    from rpg_dist.serve.config import ServeConfig

    flags = {"host": args.host, "port": args.port, "replicas": args.replicas}
    data = configlib.apply_overrides(ServeConfig, {k: v for k, v in flags.items() if v is not None}, args.overrides)
    cfg = configlib.build(ServeConfig, data, "serve")
    from rpg_dist.serve import app

    url = app.start(args.run, cfg, args.address)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    print(f"serving {args.run} at {url} (POST /recommend, GET /healthz, GET /info); Ctrl-C stops", flush=True)
    stopped.wait()
    app.stop(local=args.address is None)
    print("stopped", flush=True)
    return 0


def _submit(args: argparse.Namespace) -> int:
    from launch.submit import submit

    return submit(args.address, args.config, args.overrides, command=args.job_command, wait=args.wait)


if __name__ == "__main__":
    sys.exit(main())
