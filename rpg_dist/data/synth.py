"""A synthetic, learnable catalogue: the embedded default and the scale benchmarks' data.

Items have text built from structured attributes (department > category > product type, brand,
descriptors), so text-derived semantic IDs carry the structure. Users prefer one or two departments
and move between complementary product types (shampoo -> conditioner) with some brand loyalty, so the
next item is predictable from the history and from the item text. Everything is vectorised over
items and users (a loop over time steps only), so millions of items take seconds.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rpg_dist.data.raw import RawDataset

TAXONOMY: dict[str, dict[str, list[str]]] = {
    "Beauty": {
        "Makeup": ["lipstick", "mascara", "eyeliner", "foundation", "blush"],
        "Skin Care": ["moisturizer", "serum", "cleanser", "sunscreen", "toner"],
        "Hair Care": ["shampoo", "conditioner", "hair oil", "hair spray", "hair mask"],
    },
    "Electronics": {
        "Audio": ["headphones", "earbuds", "bluetooth speaker", "soundbar"],
        "Computer Accessories": ["keyboard", "wireless mouse", "monitor stand", "usb hub"],
        "Phone Accessories": ["phone case", "wall charger", "screen protector", "power bank"],
    },
    "Home & Kitchen": {
        "Cookware": ["frying pan", "saucepan", "dutch oven", "wok"],
        "Kitchen Tools": ["spatula", "chef knife", "cutting board", "vegetable peeler"],
        "Bedding": ["pillow", "duvet", "sheet set", "throw blanket"],
    },
    "Sports & Outdoors": {
        "Fitness": ["yoga mat", "dumbbell", "resistance band", "jump rope"],
        "Camping": ["tent", "sleeping bag", "camping lantern", "hiking backpack"],
        "Cycling": ["bike helmet", "bike light", "water bottle", "cycling gloves"],
    },
    "Pet Supplies": {
        "Dogs": ["dog food", "dog leash", "chew toy", "dog bed"],
        "Cats": ["cat litter", "cat food", "scratching post", "cat toy"],
    },
    "Office Products": {
        "Writing": ["notebook", "gel pen set", "highlighter", "fountain pen"],
        "Desk": ["desk lamp", "stapler", "desk organizer", "paper tray"],
    },
    "Garden": {
        "Watering": ["garden hose", "watering can", "sprinkler", "hose nozzle"],
        "Tools": ["pruning shears", "garden trowel", "rake", "planter"],
    },
}
ADJECTIVES = [
    "premium", "classic", "ultra", "compact", "professional", "eco-friendly", "deluxe", "portable",
    "lightweight", "heavy-duty", "organic", "vintage", "modern", "soft", "waterproof", "travel",
]
COLORS = ["black", "white", "red", "blue", "green", "pink", "silver", "gold", "navy", "beige", "purple", "grey"]
SIZES = ["small", "medium", "large", "travel size", "2-pack", "family pack", "set of 3", "refill"]
_BRAND_HEADS = ["Al", "Bel", "Cor", "Dor", "El", "Fen", "Gal", "Hal", "Ix", "Jor", "Kel", "Lum", "Mor",
                "Nov", "Or", "Pax", "Quin", "Ros", "Sol", "Tor", "Ul", "Vex", "Wyn", "Xan", "Yor", "Zen"]
_BRAND_TAILS = ["a", "ex", "ion", "ora", "us", "ix", "on", "ia", "ar", "eon"]

# Next-product-type mixture: complementary type, same type again, any type of a preferred department.
P_COMPLEMENT, P_SAME_TYPE = 0.5, 0.15
P_SAME_BRAND = 0.5


def generate(n_items: int, n_users: int, seed: int = 0, mean_length: float = 9.0, max_length: int = 60):
    """A ``RawDataset`` with ``n_items`` items (ids 1..n) and ``n_users`` users (ids 1..n)."""

    rng = np.random.default_rng(seed)
    leaves = _leaves()
    catalogue = _catalogue(n_items, leaves, rng)
    lengths, flat = _sequences(n_users, catalogue, leaves, rng, mean_length, max_length)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    sequences = pa.table(
        {
            "user_id": pa.array(np.arange(1, n_users + 1), pa.int64()),
            "item_ids": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat + 1, pa.int64())),
        }
    )
    return RawDataset(
        items=_item_table(catalogue, leaves),
        sequences=sequences,
        items_origin="synth:items",
        sequences_origin="synth:sequences",
        first_row=0,
    )


def _leaves() -> dict[str, np.ndarray]:
    dept, sub, noun = [], [], []
    for d_name, subs in TAXONOMY.items():
        for s_name, nouns in subs.items():
            for n_name in nouns:
                dept.append(d_name)
                sub.append(s_name)
                noun.append(n_name)
    dept_names = list(TAXONOMY)
    dept_index = np.array([dept_names.index(d) for d in dept])
    return {"dept": np.array(dept), "sub": np.array(sub), "noun": np.array(noun), "dept_index": dept_index}


def _catalogue(n_items: int, leaves: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    n_leaf = len(leaves["noun"])
    n_dept = len(TAXONOMY)
    brands = np.array([h + t for h in _BRAND_HEADS for t in _BRAND_TAILS])
    brand_dept = rng.integers(0, n_dept, len(brands))
    leaf_weight = rng.pareto(1.5, n_leaf) + 1.0
    leaf = rng.choice(n_leaf, n_items, p=leaf_weight / leaf_weight.sum())
    # A brand from the item's department (every department owns some brands).
    brand = np.empty(n_items, np.int64)
    for d in range(n_dept):
        own = np.flatnonzero(brand_dept == d)
        mask = leaves["dept_index"][leaf] == d
        brand[mask] = own[rng.integers(0, len(own), mask.sum())]
    return {
        "leaf": leaf,
        "brand": brand,
        "brand_names": brands,
        "adjective": rng.integers(0, len(ADJECTIVES), n_items),
        "color": rng.integers(0, len(COLORS), n_items),
        "size": rng.integers(0, len(SIZES), n_items),
        "popularity": rng.pareto(1.2, n_items) + 1.0,
    }


def _sequences(n_users, catalogue, leaves, rng, mean_length, max_length) -> tuple[np.ndarray, np.ndarray]:
    """Users walk product types; returns (lengths, flat 0-based item rows)."""
    n_leaf = len(leaves["noun"])
    n_dept = len(TAXONOMY)
    dept_of_leaf = leaves["dept_index"]
    # Three complementary types per type, inside its department.
    complements = np.stack(
        [rng.permutation(np.flatnonzero(dept_of_leaf == dept_of_leaf[k]))[:3] for k in range(n_leaf)]
    )
    by_leaf = GroupSampler(catalogue["leaf"], catalogue["popularity"])
    by_leaf_brand = GroupSampler(catalogue["leaf"] * len(catalogue["brand_names"]) + catalogue["brand"], catalogue["popularity"])
    favourite = rng.integers(0, n_dept, (n_users, 2))
    lengths = np.minimum(5 + rng.geometric(1.0 / max(mean_length - 4.0, 1.0), n_users) - 1, max_length)
    steps = np.zeros((n_users, int(lengths.max())), np.int64)
    leaf = _leaf_in_departments(favourite[:, 0], dept_of_leaf, rng)
    item = by_leaf.sample(leaf, rng)
    steps[:, 0] = item
    for t in range(1, steps.shape[1]):
        draw = rng.random(n_users)
        comp = complements[leaf, rng.integers(0, 3, n_users)]
        pref = _leaf_in_departments(favourite[np.arange(n_users), rng.integers(0, 2, n_users)], dept_of_leaf, rng)
        leaf = np.where(draw < P_COMPLEMENT, comp, np.where(draw < P_COMPLEMENT + P_SAME_TYPE, leaf, pref))
        key = leaf * len(catalogue["brand_names"]) + catalogue["brand"][item]
        loyal = (rng.random(n_users) < P_SAME_BRAND) & by_leaf_brand.has(key)
        previous = item
        item = np.where(loyal, by_leaf_brand.sample(np.where(loyal, key, by_leaf_brand.keys[0]), rng), by_leaf.sample(leaf, rng))
        # One redraw when the walk picked the item it is on (buying the same item twice is rare).
        again = item == previous
        item[again] = by_leaf.sample(leaf[again], rng)
        steps[:, t] = item
    mask = np.arange(steps.shape[1])[None, :] < lengths[:, None]
    return lengths, steps[mask]


def _leaf_in_departments(dept: np.ndarray, dept_of_leaf: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random product type of each user's department ``dept``."""
    order = np.argsort(dept_of_leaf, kind="stable")
    counts = np.bincount(dept_of_leaf, minlength=dept.max() + 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return order[starts[dept] + (rng.random(len(dept)) * counts[dept]).astype(np.int64)]


class GroupSampler:
    """Draw one item per query from the group ``key``, proportionally to popularity (vectorised)."""

    def __init__(self, keys: np.ndarray, weight: np.ndarray) -> None:
        order = np.argsort(keys, kind="stable")
        self.items = order
        sorted_keys = keys[order]
        self.keys, starts = np.unique(sorted_keys, return_index=True)
        group = np.searchsorted(self.keys, sorted_keys)
        w = weight[order]
        totals = np.bincount(group, weights=w)
        within = np.cumsum(w) - np.concatenate([[0.0], np.cumsum(totals)[:-1]])[group]
        # Global CDF: group g covers (g, g + 1].
        self.cdf = group + within / totals[group]

    def has(self, key: np.ndarray) -> np.ndarray:
        pos = np.clip(np.searchsorted(self.keys, key), 0, len(self.keys) - 1)
        return self.keys[pos] == key

    def sample(self, key: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        group = np.searchsorted(self.keys, key)
        pos = np.searchsorted(self.cdf, group + rng.random(len(key)))
        return self.items[np.minimum(pos, len(self.items) - 1)]


def _item_table(catalogue: dict[str, np.ndarray], leaves: dict[str, np.ndarray]) -> pa.Table:
    leaf = catalogue["leaf"]
    brand = pa.array(catalogue["brand_names"][catalogue["brand"]])
    noun = pa.array(leaves["noun"][leaf])
    title = pc.binary_join_element_wise(
        brand,
        pa.array(np.array(ADJECTIVES)[catalogue["adjective"]]),
        pa.array(np.array(COLORS)[catalogue["color"]]),
        pc.binary_join_element_wise(noun, pa.array(np.array(SIZES)[catalogue["size"]]), ", "),
        " ",
    )
    category = pc.binary_join_element_wise(
        pa.array(leaves["dept"][leaf]), pa.array(leaves["sub"][leaf]), noun, ", "
    )
    text = pc.binary_join_element_wise(title, brand, category, ". ")
    n_items = len(leaf)
    return pa.table(
        {
            "item_id": pa.array(np.arange(1, n_items + 1), pa.int64()),
            "text": pc.binary_join_element_wise(text, pa.scalar(""), "."),
            "title": title,
            "brand": brand,
            "category": category,
        }
    )
