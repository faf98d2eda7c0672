"""Helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations


def tiny_config(dataset: str, run_dir: str, **sections) -> dict:
    """The smallest config that exercises every stage (800 items, 8 digits, a 1-layer model)."""
    cfg = {
        "dataset": dataset,
        "run_dir": run_dir,
        "seed": 7,
        "prepare": {"format": "synth", "n_items": 800, "n_users": 600},
        "ray": {"num_cpus": 2},
        "tokenize": {"n_digit": 8, "opq_niter": 2, "shard_size": 256, "embed_batch_size": 64},
        "model": {"d_model": 32, "n_head": 2, "d_ffn": 64, "n_layer": 1, "embd_dropout": 0.1,
                  "attn_dropout": 0.1, "max_seq_len": 20},
        "train": {"launcher": "local", "batch_size": 64, "epochs": 2, "warmup_steps": 5, "lr": 0.003, "log_every": 5},
        "graph": {"n_edges": 10, "num_actors": 1, "n_partitions": 2},
        "decode": {"num_beams": 10, "steps": 2},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg
