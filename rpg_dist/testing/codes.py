"""Synthetic semantic IDs and token tables for graph tests and scale benchmarks.

``clustered_codes`` mimics text-derived semantic IDs: items come in topics, an item copies each digit
of its topic's prototype code with probability ``keep`` and draws it at random otherwise, so items of
one topic share most digits (as near-duplicate products do under OPQ) while digits stay independent.
``keep=0`` gives uniformly random codes: no neighbourhood structure at all, the worst case for any
approximate index.

``taxonomy_codes`` nests that: departments > categories > items (like ``rpg_dist.data.synth``'s
catalogue), each level copying its parent's digits with its own probability, so similarity is graded:
same category > same department > elsewhere.
"""

from __future__ import annotations

import torch


def clustered_codes(n_items: int, n_digit: int, n_clusters: int, keep: float, seed: int,
                    codebook_size: int = 256) -> torch.Tensor:
    """(n_items, n_digit) int16 codes: topic prototypes with each digit kept with probability ``keep``."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randint(0, codebook_size, (n_clusters, n_digit), generator=gen)
    topic = torch.randint(0, n_clusters, (n_items,), generator=gen)
    noise = torch.randint(0, codebook_size, (n_items, n_digit), generator=gen)
    kept = torch.rand(n_items, n_digit, generator=gen) < keep
    return torch.where(kept, prototypes[topic], noise).to(torch.int16)


def random_token_table(n_digit: int, codebook_size: int, dim: int, seed: int) -> torch.Tensor:
    """(m, V, d) i.i.d. Gaussian token embeddings (the benchmarks' "random token tables")."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_digit, codebook_size, dim, generator=gen)


def taxonomy_codes(n_items: int, n_digit: int, levels: list[tuple[int, float]], keep: float, seed: int,
                   codebook_size: int = 256) -> torch.Tensor:
    """(n_items, n_digit) int16 codes from a hierarchy of prototype codes.

    Args:
        levels: (n_groups, keep_from_parent) from the top level down; the top level's prototypes are
            uniformly random (its keep is ignored), each lower group picks a random parent group.
        keep: probability that an item copies a digit of its leaf group's prototype.
    """
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randint(0, codebook_size, (levels[0][0], n_digit), generator=gen)
    for n_groups, keep_parent in levels[1:]:
        parent = torch.randint(0, prototypes.shape[0], (n_groups,), generator=gen)
        fresh = torch.randint(0, codebook_size, (n_groups, n_digit), generator=gen)
        kept = torch.rand(n_groups, n_digit, generator=gen) < keep_parent
        prototypes = torch.where(kept, prototypes[parent], fresh)
    group = torch.randint(0, prototypes.shape[0], (n_items,), generator=gen)
    fresh = torch.randint(0, codebook_size, (n_items, n_digit), generator=gen)
    kept = torch.rand(n_items, n_digit, generator=gen) < keep
    return torch.where(kept, prototypes[group], fresh).to(torch.int16)
