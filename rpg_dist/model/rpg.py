"""RPG's parallel-ID transformer: a GPT-2 style causal decoder with m tied cosine heads.

Pure torch: no Ray, DeepSpeed or collective communication here, so the same module trains under any
launcher and loads for serving on a bare CPU.

Shapes used below: B sequences padded to T positions; P = the real (unpadded) positions of a batch;
N = positions that carry a label; m = n_digit; V = codebook_size; d = d_model; H = n_head.

The transformer runs on *packed* tokens: every per-position layer (layer norms, projections, MLP)
sees only the P real positions, and only attention scatters them into a (B, T) grid. Beauty's
windows average ~11.5 inputs of at most 50, so packing does about a quarter of the work of padding
every window to 50 (the reference code), while computing exactly the same function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rpg_dist.model.config import ModelConfig

# Item tensors are right-padded; positions at or after a sequence's length are never read, and by
# convention hold PAD. In `targets`, PAD marks a position without a label.
PAD = -1


def right_pad(values, lengths):
    """Concatenated sequences -> (B, T) int64 rows right-padded with PAD, T = longest length.

    values: (sum(lengths),) the sequences one after another; lengths: (B,) each >= 1 (numpy).
    """
    lengths = np.asarray(lengths, np.int64)
    row = np.repeat(np.arange(len(lengths)), lengths)  # (P,)
    pos = np.arange(len(row)) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # (P,)
    items = np.full((len(lengths), int(lengths.max())), PAD, np.int64)
    items[row, pos] = values
    return items


# Sequences per attention grid: the batch is sorted by length and cut into groups of this many, each
# padded only to its own longest sequence, so attention's padding stays small.
ATTENTION_GROUP = 32


@dataclass(frozen=True)
class Packing:
    """Where the P real positions of a right-padded (B, T) batch go, and in which order.

    Packed tokens are listed sequence by sequence in ascending-length order, so that attention can
    process consecutive groups of similar length.

    index: (P,) flat grid position b * T + t of each packed token (b in the original batch order).
    positions: (P,) t, the token's position inside its sequence.
    last: (B,) packed row of each sequence's last real position (original batch order).
    groups: per attention group, (first packed token, end, n sequences, grid width, grid index (P_g,)
        of each of its tokens in a (n * width) grid).
    """

    index: torch.Tensor
    positions: torch.Tensor
    last: torch.Tensor
    groups: tuple[tuple[int, int, int, int, torch.Tensor], ...]

    @staticmethod
    def from_lengths(lengths: torch.Tensor, length: int, group: int = ATTENTION_GROUP) -> Packing:
        """Packing of sequences with ``lengths`` (B,), each in [1, length], in a (B, length) grid."""
        order = torch.argsort(lengths, stable=True)  # (B,) ascending length
        sorted_lengths = lengths[order]
        ends = torch.cumsum(sorted_lengths, 0)  # (B,)
        starts = ends - sorted_lengths
        seq = torch.repeat_interleave(torch.arange(len(order), device=lengths.device), sorted_lengths)  # (P,)
        positions = torch.arange(seq.numel(), device=lengths.device) - starts[seq]  # (P,)
        last = torch.empty_like(ends)
        last[order] = ends - 1
        groups = []
        bounds = ends.tolist()
        widths = sorted_lengths.tolist()
        for first in range(0, len(order), group):
            stop = min(first + group, len(order))
            lo, hi, width = (bounds[first - 1] if first else 0), bounds[stop - 1], widths[stop - 1]
            grid = (seq[lo:hi] - first) * width + positions[lo:hi]  # (P_g,)
            groups.append((lo, hi, stop - first, width, grid))
        return Packing(index=order[seq] * length + positions, positions=positions, last=last, groups=tuple(groups))


class _InjectiveGather(torch.autograd.Function):
    """``source.index_select(0, index)`` for indices without repeats.

    Autograd's generic backward accumulates with index_add (sorting the indices first), which on CPU
    costs more than the attention it serves; distinct indices need only a scatter.
    """

    @staticmethod
    def forward(ctx, source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = source.shape[0]
        return source.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        out = grad.new_zeros((ctx.rows, *grad.shape[1:])).index_copy_(0, index, grad)
        return out, None


def gather_rows(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (distinct) of ``source``: (R, ...) -> (len(index), ...)."""
    return _InjectiveGather.apply(source, index)


class Block(nn.Module):
    """Pre-LN GPT-2 block on packed tokens: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_head = cfg.n_head
        self.attn_dropout = cfg.attn_dropout
        self.ln_1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.attn_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.fc = nn.Linear(d, cfg.d_ffn)
        self.mlp_proj = nn.Linear(cfg.d_ffn, d)
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)

    def forward(self, x: torch.Tensor, packing: Packing, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(P, d) -> (P, d), or only the (R, d) outputs at packed ``rows``.

        Every position's keys and values are still computed; in the last block only the needed
        rows go through the output projection and the MLP (a third of the block's work).
        """
        attended = self._attention(self.ln_1(x), packing)  # (P, d)
        if rows is not None:
            x, attended = gather_rows(x, rows), gather_rows(attended, rows)
        x = x + self.resid_dropout(self.attn_proj(attended))
        # GPT-2's "gelu_new" is the tanh approximation.
        h = F.gelu(self.fc(self.ln_2(x)), approximate="tanh")
        return x + self.resid_dropout(self.mlp_proj(h))

    def _attention(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        """Causal self-attention of packed (P, d) tokens within their own sequence."""
        d, h = x.shape[1], self.n_head
        qkv = self.qkv(x)  # (P, 3d)
        dropout = self.attn_dropout if self.training else 0.0
        outputs = []
        # split (not slicing) so that backward concatenates the groups' gradients instead of
        # adding one zero-filled (P, 3d) tensor per group.
        chunks = qkv.split([hi - lo for lo, hi, *_ in packing.groups])
        for chunk, (_, _, n, width, grid_index) in zip(chunks, packing.groups):
            # Right padding plus the causal mask means a real query never sees a pad key, so the
            # grid's zero rows need no extra mask.
            grid = chunk.new_zeros(n * width, 3 * d).index_copy(0, grid_index, chunk)
            q, k, v = grid.view(n, width, 3, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)  # (n, H, W, d/H)
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
            outputs.append(gather_rows(out.transpose(1, 2).reshape(n * width, d), grid_index))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]  # (P, d)


class RPG(nn.Module):
    """RPG: predicts all m digits of the next item's semantic ID in parallel.

    An item's input vector is the mean of its m token embeddings; the decoder's state at a position
    feeds m residual heads ``x + SiLU(W_k x + b_k)``, and the logit of token j of digit k is
    ``cos(state_k, token_embeddings[k, j]) / temperature`` (the output table is the input table).

    Args:
        cfg: the model config.
        n_digit: m, digits per semantic ID.
        codebook_size: V, tokens per digit.
        item_codes: (n_items, m) token of each dense item row in each digit, values in [0, V).
    """

    def __init__(self, cfg: ModelConfig, n_digit: int, codebook_size: int, item_codes: torch.Tensor) -> None:
        super().__init__()
        if item_codes.dim() != 2 or item_codes.shape[1] != n_digit:
            raise ValueError(f"item_codes: expected shape (n_items, {n_digit}), got {tuple(item_codes.shape)}")
        self.cfg = cfg
        self.n_digit = n_digit
        self.codebook_size = codebook_size
        d = cfg.d_model
        # Not saved with the weights: the codes come from the tokenizer's semantic_ids.parquet.
        self.register_buffer("item_codes", item_codes.to(torch.int16), persistent=False)
        # Offset of digit k's block in the flattened (m*V, d) token table.
        self.register_buffer("digit_offsets", torch.arange(n_digit) * codebook_size, persistent=False)
        self.token_embeddings = nn.Parameter(torch.empty(n_digit, codebook_size, d))  # (m, V, d)
        self.position_embeddings = nn.Parameter(torch.empty(cfg.max_seq_len, d))  # (T_max, d)
        self.embd_dropout = nn.Dropout(cfg.embd_dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        # The m heads as one (m*d, d) linear map: W_k is head_weight[k] in nn.Linear's (out, in) layout.
        self.head_weight = nn.Parameter(torch.empty(n_digit, d, d))  # (m, d, d)
        self.head_bias = nn.Parameter(torch.empty(n_digit, d))  # (m, d)
        self.reset_parameters()
        # ``label_loss`` through torch.compile once ``compile_label_loss`` is called (training only).
        self._compiled_label_loss = None

    @property
    def n_items(self) -> int:
        return self.item_codes.shape[0]

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, std) weights, zero biases, residual output projections scaled by
        1/sqrt(2 n_layer); the heads start as the identity map (W = 0, nn.Linear's default bias)."""
        std = self.cfg.init_std
        nn.init.normal_(self.token_embeddings, std=std)
        nn.init.normal_(self.position_embeddings, std=std)
        for block in self.blocks:
            for linear in (block.qkv, block.attn_proj, block.fc, block.mlp_proj):
                nn.init.normal_(linear.weight, std=std)
                nn.init.zeros_(linear.bias)
            for proj in (block.attn_proj, block.mlp_proj):
                nn.init.normal_(proj.weight, std=std / math.sqrt(2 * self.cfg.n_layer))
        nn.init.zeros_(self.head_weight)
        bound = 1.0 / math.sqrt(self.cfg.d_model)
        nn.init.uniform_(self.head_bias, -bound, bound)

    def packing(self, lengths: torch.Tensor, length: int) -> Packing:
        """The packing of a (B, ``length``) batch with ``lengths`` real positions per sequence."""
        if length > self.cfg.max_seq_len:
            raise ValueError(f"sequences of {length} positions exceed max_seq_len {self.cfg.max_seq_len}")
        return Packing.from_lengths(lengths, length)

    def hidden_states(self, items: torch.Tensor, packing: Packing, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder output at the real positions.

        Args:
            items: (B, T) dense item rows, right-padded.
            packing: the real positions of ``items``.
            rows: (R,) distinct packed rows whose output is needed; None = all.

        Returns:
            (P, d) or (R, d) final-layer-norm states.
        """
        item_rows = items.reshape(-1).index_select(0, packing.index)  # (P,)
        tokens = self.item_codes[item_rows].long() + self.digit_offsets  # (P, m) into the (m*V) table
        table = self.token_embeddings.reshape(-1, self.cfg.d_model)  # (m*V, d)
        # Mean of the m token embeddings per item, without materialising (P, m, d).
        x = F.embedding_bag(tokens, table, mode="mean")  # (P, d)
        x = self.embd_dropout(x + self.position_embeddings[packing.positions])
        for i, block in enumerate(self.blocks):
            x = block(x, packing, rows if i == len(self.blocks) - 1 else None)
        return self.ln_f(x)

    def digit_states(self, hidden: torch.Tensor) -> torch.Tensor:
        """The m head outputs ``x + SiLU(W_k x + b_k)``: (N, d) -> (m, d, N), one GEMM for all heads.

        The digit-major, position-last layout comes straight out of ``W (m*d, d) @ hidden^T`` and
        feeds the per-digit logit GEMMs without any transposing copy.
        """
        n, d = hidden.shape
        z = torch.addmm(self.head_bias.reshape(-1, 1), self.head_weight.reshape(-1, d), hidden.t())  # (m*d, N)
        # Under bf16 autocast z is bf16; keeping the sum in z's dtype halves the traffic of the
        # largest activation, and the logit GEMM would round it to bf16 anyway.
        return hidden.t().to(z.dtype).unsqueeze(0) + F.silu(z).view(self.n_digit, d, n)

    def digit_logits(self, states: torch.Tensor) -> torch.Tensor:
        """Cosine logits over each digit's codebook: (m, d, N) -> (m, N, V).

        cos(s, e) / temperature = (s . e_hat) / (|s| temperature): the state norm scales the (m, N, V)
        logits instead of normalising the larger (m, d, N) states.
        """
        table = F.normalize(self.token_embeddings, dim=-1)  # (m, V, d)
        raw = torch.bmm(states.transpose(1, 2), table.transpose(1, 2))  # (m, N, V)
        # Accumulates in fp32 even for bf16 states; asking for an fp32 result instead would first
        # convert all of (m, d, N), forward and backward.
        norms = torch.linalg.vector_norm(states, dim=1).float().clamp_min(1e-12)  # (m, N), as F.normalize
        return raw * (norms * self.cfg.temperature).reciprocal().unsqueeze(-1)

    def forward(
        self,
        items: torch.Tensor,
        lengths: torch.Tensor,
        targets: torch.Tensor,
        denominator: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """Multi-token prediction loss: mean over digits of the cross-entropy of each label's tokens.

        Args:
            items: (B, T) input item rows, right-padded.
            lengths: (B,) real positions per sequence (>= 1).
            targets: (B, T) the next item's row at labelled positions, PAD elsewhere.
            denominator: labelled positions to average over; None = this batch's count. Data-parallel
                training passes the step's global count so that ranks and micro-batches of unequal
                sizes still give the mean over the whole batch.

        Returns:
            Scalar loss; with the default denominator, exactly the reference code's
            ``mean_k CrossEntropy(logits_k, codes_k)`` over the labelled positions.
        """
        packing = self.packing(lengths, items.shape[1])
        labels = targets.reshape(-1).index_select(0, packing.index)  # (P,)
        labelled = (labels != PAD).nonzero().squeeze(1)  # (N,)
        hidden = self.hidden_states(items, packing, labelled)  # (N, d)
        codes = self.item_codes[labels.index_select(0, labelled)].long().t()  # (m, N)
        total = (self._compiled_label_loss or self.label_loss)(hidden, codes)
        count = labelled.numel() if denominator is None else denominator
        return total / (self.n_digit * count)

    def label_loss(self, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every digit's cosine logits, summed: hidden (N, d), codes (m, N) -> scalar."""
        logits = self.digit_logits(self.digit_states(hidden))  # (m, N, V)
        return F.cross_entropy(logits.reshape(-1, self.codebook_size).float(), codes.reshape(-1), reduction="sum")

    def compile_label_loss(self) -> None:
        """Run ``label_loss`` (heads, cosine logits, cross-entropy) through torch.compile.

        Half of a CPU training step outside the GEMMs is elementwise work on the (m, d, N) head
        states and the (m, N, V) logits (SiLU, residual, norms, scaling, dtype casts, softmax),
        each a separate pass in eager mode; inductor fuses them. Shapes are dynamic (N varies by
        batch), so one compilation serves the run; the first step pays for it.
        """
        self._compiled_label_loss = torch.compile(self.label_loss, dynamic=True)

    def next_token_log_probs(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Per-digit log-probabilities of the next item's tokens after each sequence.

        Args:
            items: (B, T) dense item rows, right-padded (pad with PAD = -1 by convention; values at
                positions >= length are ignored).
            lengths: (B,) real positions per sequence, each in [1, T].

        Returns:
            (B, m, V) log-softmax over each digit's V tokens of the cosine logits / temperature at
            each sequence's last real position.
        """
        _check_batch(items, lengths, self.n_items)
        packing = self.packing(lengths, items.shape[1])
        last = self.hidden_states(items, packing, packing.last)  # (B, d)
        logits = self.digit_logits(self.digit_states(last))  # (m, B, V)
        return F.log_softmax(logits.float(), dim=-1).transpose(0, 1).contiguous()  # (B, m, V)


def _check_batch(items: torch.Tensor, lengths: torch.Tensor, n_items: int) -> None:
    """Reject lengths outside [1, T] and item rows outside [0, n_items) at real positions."""
    if items.dim() != 2 or lengths.shape != (items.shape[0],):
        raise ValueError(f"items must be (B, T) and lengths (B,); got {tuple(items.shape)} and {tuple(lengths.shape)}")
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > items.shape[1]):
        raise ValueError(f"lengths must lie in [1, {items.shape[1]}]; got {lengths.tolist()[:8]}...")
    real = torch.arange(items.shape[1], device=items.device) < lengths.unsqueeze(1)
    rows = items[real]
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n_items):
        bad = int(((items < 0) | (items >= n_items)).logical_and(real).nonzero()[0, 0])
        raise ValueError(f"items: sequence {bad} holds an item row outside [0, {n_items})")
