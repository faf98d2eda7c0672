"""``synth --like``: the generator reproduces a real catalogue's statistics (fitted on Beauty's own
MiniLM embeddings), and the taxonomy generator, a negative control, does not."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rpg_dist.data import dataset, realistic, synth
from rpg_dist.data.items import ItemIndex
from rpg_dist.data.splits import leave_one_out
from rpg_dist.tokenizer import opq
from rpg_dist.tokenizer.config import TokenizeConfig

pytestmark = [pytest.mark.slow, pytest.mark.data]

N_SAMPLE = 3000  # the size of conftest's beauty_slice
TOKENIZE = TokenizeConfig(n_digit=16, pca_dim=64, opq_niter=8)


from conftest import encode_texts as _encode


def _codes(vectors: np.ndarray) -> np.ndarray:
    return opq.encode(opq.train_index(vectors, TOKENIZE, seed=0, threads=torch.get_num_threads()), vectors)


def _statistics(vectors: np.ndarray) -> dict:
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    table = torch.randn(16, 256, 64, generator=torch.Generator().manual_seed(0)) * 0.02  # an untrained table
    return realistic.catalogue_statistics(x, _codes(x), table, sample=1000, ranks=(1, 10, 100))


def realism_failures(real: dict, other: dict) -> list[str]:
    """The statistics on which ``other`` is not within tolerance of ``real``."""
    failures = []
    if abs(real["digit_entropy_bits_mean"] - other["digit_entropy_bits_mean"]) >= 0.05:
        failures.append("digit entropy")
    if abs(real["collision_rate"] - other["collision_rate"]) >= 0.005:
        failures.append("collision rate")
    for rank in (1, 10, 100):
        r, o = real[f"embedding_cosine_rank{rank}_p10_p50_p90"], other[f"embedding_cosine_rank{rank}_p10_p50_p90"]
        # Largest gap measured: 0.064 (rank-1 p10, fp32 MiniLM vectors; 0.06 held on bf16 ones).
        if np.abs(np.subtract(r, o)).max() >= 0.07:
            failures.append(f"rank-{rank} neighbour cosine")
        r, o = real[f"shared_digits_rank{rank}_p10_p50_p90"], other[f"shared_digits_rank{rank}_p10_p50_p90"]
        if abs(r[1] - o[1]) > 1:
            failures.append(f"rank-{rank} shared digits")
    return failures


def test_generated_catalogue_matches_the_real_one(beauty_slice):
    item_ids, vectors, sequences = beauty_slice
    split = leave_one_out(sequences, max_len=50)
    lengths = np.diff(sequences.column("item_ids").combine_chunks().offsets.to_numpy())
    model = realistic.fit(vectors, item_ids, split.train, lengths, seed=0)
    drawn = np.concatenate([x for _, _, x, _ in realistic.generate_items(model, len(vectors), seed=1)])
    real, fake = _statistics(vectors), _statistics(drawn)
    # Negative control: the taxonomy generator's catalogue, embedded by the same encoder.
    control_text = synth.generate(n_items=N_SAMPLE, n_users=10, seed=0).items.column("text").to_pylist()
    control = _statistics(_encode(control_text))
    print(json.dumps({"real": real, "generated": fake, "taxonomy": control}))
    assert realism_failures(real, fake) == []
    assert len(realism_failures(real, control)) >= 2


def test_generated_users_and_items_are_well_formed(beauty_slice, tmp_path):
    item_ids, vectors, sequences = beauty_slice
    split = leave_one_out(sequences, max_len=50)
    lengths = np.diff(sequences.column("item_ids").combine_chunks().offsets.to_numpy())
    model = realistic.fit(vectors, item_ids, split.train, lengths, seed=0)
    out = str(tmp_path / "ds")
    info = realistic.write_catalogue(model, 5000, 2000, out, seed=3)
    assert (info.n_items, info.n_users) == (5000, 2000)
    items = dataset.read_items(out, columns=["item_id", "embedding", "component"])
    emb = items.column("embedding").combine_chunks().flatten().to_numpy().reshape(5000, -1)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    seqs = dataset.read_sequences(out)
    lens = np.diff(seqs.column("item_ids").combine_chunks().offsets.to_numpy())
    assert lens.min() >= 1 and set(np.unique(lens)) <= set(np.unique(lengths))
    # Users follow the fitted transitions: consecutive items share a component far more often than
    # two items drawn at random do.
    index = ItemIndex(items.column("item_id").to_numpy())
    comp = items.column("component").to_numpy()[index.rows(seqs.column("item_ids").combine_chunks().flatten().to_numpy())]
    offsets = seqs.column("item_ids").combine_chunks().offsets.to_numpy()
    starts = np.zeros(len(comp), bool)
    starts[offsets[:-1]] = True
    same = (comp[1:] == comp[:-1])[~starts[1:]].mean()
    assert same > 10 * np.square(np.bincount(comp) / len(comp)).sum()
    # Deterministic given the seed.
    again = realistic.write_catalogue(model, 5000, 2000, str(tmp_path / "again"), seed=3)
    assert again == info
    assert dataset.read_sequences(str(tmp_path / "again")).equals(seqs)
