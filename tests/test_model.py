"""RPG model: the packed, digit-batched fast path against a padded, per-digit reference twin."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rpg_dist.model.config import ModelConfig
from rpg_dist.model.rpg import PAD, RPG

M, V = 4, 16


def tiny_model(seed: int = 0, n_items: int = 30, **overrides) -> RPG:
    """A small RPG with random (non-identity) heads so every term of the loss matters."""
    torch.manual_seed(seed)
    kwargs = dict(n_layer=2, d_model=32, n_head=4, d_ffn=48, max_seq_len=12,
                  embd_dropout=0.0, attn_dropout=0.0, temperature=0.1)
    kwargs.update(overrides)
    codes = torch.randint(0, V, (n_items, M))
    model = RPG(ModelConfig(**kwargs), M, V, codes)
    with torch.no_grad():
        model.head_weight.normal_(std=0.1)
    return model.eval()


def random_batch(seed: int, n_items: int = 30, batch: int = 5, length: int = 9):
    """Right-padded windows with labels on the last ``n_targets`` real positions."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[0] = length
    items = torch.randint(0, n_items, (batch, length), generator=gen)
    real = torch.arange(length) < lengths[:, None]
    items[~real] = PAD
    n_targets = torch.minimum(torch.randint(1, length + 1, (batch,), generator=gen), lengths)
    labelled = real & (torch.arange(length) >= (lengths - n_targets)[:, None])
    targets = torch.where(labelled, torch.randint(0, n_items, (batch, length), generator=gen), PAD)
    return items, lengths, targets


def reference_hidden(model: RPG, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, d) decoder states computed the reference way: padded grid, explicit masks and loops."""
    b, t = items.shape
    rows = items.clamp(min=0)
    per_digit = [model.token_embeddings[k][model.item_codes[rows, k].long()] for k in range(M)]
    x = torch.stack(per_digit).mean(0) + model.position_embeddings[:t]  # (B, T, d)
    real = torch.arange(t) < lengths[:, None]  # (B, T)
    allowed = torch.tril(torch.ones(t, t, dtype=torch.bool)) & real[:, None, :]  # (B, Tq, Tk)
    for block in model.blocks:
        h = block.ln_1(x)
        q, k, v = block.qkv(h).split(model.cfg.d_model, dim=-1)
        heads = lambda z: z.view(b, t, model.cfg.n_head, -1).transpose(1, 2)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        att = torch.nan_to_num(scores.softmax(-1)) @ v  # pad queries have no allowed keys
        x = x + block.attn_proj(att.transpose(1, 2).reshape(b, t, -1))
        x = x + block.mlp_proj(F.gelu(block.fc(block.ln_2(x)), approximate="tanh"))
    return model.ln_f(x)


def reference_loss(model: RPG, items, lengths, targets) -> torch.Tensor:
    """Mean over digits of per-digit cross-entropy, one Python iteration per digit (paper code)."""
    hidden = reference_hidden(model, items, lengths)
    mask = targets != PAD
    h = hidden[mask]  # (N, d)
    codes = model.item_codes[targets[mask]].long()  # (N, m)
    losses = []
    for k in range(M):
        state = h + F.silu(F.linear(h, model.head_weight[k], model.head_bias[k]))
        logits = F.normalize(state, dim=-1) @ F.normalize(model.token_embeddings[k], dim=-1).T
        losses.append(F.cross_entropy(logits / model.cfg.temperature, codes[:, k]))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_loss_matches_per_digit_reference(seed):
    model = tiny_model(seed)
    items, lengths, targets = random_batch(seed)
    fast = model(items, lengths, targets)
    slow = reference_loss(model, items, lengths, targets)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    # Gradients agree too (the loss is what training differentiates).
    g_fast = torch.autograd.grad(fast, [model.token_embeddings, model.head_weight])
    g_slow = torch.autograd.grad(reference_loss(model, items, lengths, targets),
                                 [model.token_embeddings, model.head_weight])
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_compiled_label_loss_matches_per_digit_reference():
    """train.compile's fused heads + logits + loss (inductor) against the paper-style twin: loss and
    every gradient, on batches of different label counts (one dynamic-shape compilation)."""
    model = tiny_model(3).train()
    model.compile_label_loss()
    params = list(model.parameters())
    for seed, batch in ((3, 5), (4, 11)):
        items, lengths, targets = random_batch(seed, batch=batch)
        fast = model(items, lengths, targets)
        slow = reference_loss(model, items, lengths, targets)
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
        for a, b in zip(torch.autograd.grad(fast, params), torch.autograd.grad(slow, params)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_many_attention_groups_match_reference():
    """Batches larger than ATTENTION_GROUP are split into length-sorted grids; nothing changes."""
    from rpg_dist.model.rpg import ATTENTION_GROUP

    model = tiny_model(7)
    items, lengths, targets = random_batch(7, batch=2 * ATTENTION_GROUP + 7, length=12)
    torch.testing.assert_close(model(items, lengths, targets), reference_loss(model, items, lengths, targets),
                               rtol=1e-5, atol=1e-5)
    hidden = reference_hidden(model, items, lengths)
    last = hidden[torch.arange(len(lengths)), lengths - 1]
    state = last + F.silu(F.linear(last, model.head_weight[0], model.head_bias[0]))
    logits = F.normalize(state, dim=-1) @ F.normalize(model.token_embeddings[0], dim=-1).T
    torch.testing.assert_close(model.next_token_log_probs(items, lengths)[:, 0],
                               (logits / model.cfg.temperature).log_softmax(-1), rtol=1e-5, atol=1e-5)


def test_next_token_log_probs_matches_reference():
    model = tiny_model(3)
    items, lengths, _ = random_batch(3)
    fast = model.next_token_log_probs(items, lengths)  # (B, m, V)
    hidden = reference_hidden(model, items, lengths)
    last = hidden[torch.arange(len(lengths)), lengths - 1]  # (B, d)
    for k in range(M):
        state = last + F.silu(F.linear(last, model.head_weight[k], model.head_bias[k]))
        logits = F.normalize(state, dim=-1) @ F.normalize(model.token_embeddings[k], dim=-1).T
        torch.testing.assert_close(fast[:, k], (logits / model.cfg.temperature).log_softmax(-1),
                                   rtol=1e-5, atol=1e-5)
    # Padding content and grid width never change a sequence's output.
    wider = torch.full((items.shape[0], items.shape[1] + 3), 7)
    wider[:, : items.shape[1]] = items.clamp(min=0)
    torch.testing.assert_close(model.next_token_log_probs(wider, lengths), fast, rtol=1e-5, atol=1e-5)


def test_init_follows_gpt2_and_identity_heads():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, d_model=256, n_head=4, d_ffn=512, max_seq_len=50)
    model = RPG(cfg, 8, 256, torch.zeros(10, 8, dtype=torch.int16))
    assert model.token_embeddings.shape == (8, 256, 256)
    assert torch.count_nonzero(model.head_weight) == 0
    assert model.head_bias.abs().max() <= 1 / math.sqrt(256)
    assert model.token_embeddings.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.blocks[0].fc.weight.std().item() == pytest.approx(0.02, rel=0.02)
    scaled = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert model.blocks[1].mlp_proj.weight.std().item() == pytest.approx(scaled, rel=0.02)
    assert model.blocks[1].attn_proj.weight.std().item() == pytest.approx(scaled, rel=0.03)
    # Item codes are not weights: they come from the tokenizer's table.
    assert "item_codes" not in model.state_dict()


def test_dropout_only_in_training():
    model = tiny_model(4, embd_dropout=0.5, attn_dropout=0.5)
    items, lengths, targets = random_batch(4)
    assert torch.equal(model(items, lengths, targets), model(items, lengths, targets))
    model.train()
    assert not torch.equal(model(items, lengths, targets), model(items, lengths, targets))


def test_bad_batches_raise_clear_errors():
    model = tiny_model(5)
    with pytest.raises(ValueError, match="outside"):
        model.next_token_log_probs(torch.tensor([[1, 30]]), torch.tensor([2]))
    with pytest.raises(ValueError, match="lengths"):
        model.next_token_log_probs(torch.tensor([[1, 2]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.next_token_log_probs(torch.zeros(1, 13, dtype=torch.long), torch.tensor([13]))


def test_model_code_imports_no_distributed_stack():
    code = (
        "import sys, rpg_dist.model.rpg, rpg_dist.model.export\n"
        "bad = [m for m in ('ray', 'deepspeed', 'torch.distributed.run') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    import re
    from pathlib import Path

    import rpg_dist

    pattern = re.compile(r"^\s*(from|import)\s+(ray|deepspeed|torch\.distributed)\b", re.M)
    for path in (Path(rpg_dist.__file__).parent / "model").glob("*.py"):
        assert not pattern.search(path.read_text()), path


def test_export_round_trip_on_cpu_and_refuses_other_codes(tmp_path):
    from rpg_dist.artifacts import RunPaths
    from rpg_dist.model.export import load_model, model_metadata, save_model, semantic_ids_fingerprint
    from rpg_dist.tokenizer.semantic_ids import load_semantic_ids, write_semantic_ids
    from safetensors.torch import load_file

    run_dir = str(tmp_path / "run")
    paths = RunPaths(run_dir)
    model = tiny_model(6)
    item_ids = np.arange(100, 100 + model.n_items) * 3  # sparse ids: dense rows are their order
    write_semantic_ids(paths.semantic_ids, item_ids, model.item_codes.numpy())
    fingerprint = semantic_ids_fingerprint(load_semantic_ids(paths.semantic_ids))
    save_model(model.state_dict(), model_metadata(model, fingerprint, best_epoch=3), run_dir)

    weights = load_file(paths.model_weights)
    assert weights["token_embeddings"].shape == (M, V, 32)
    loaded = load_model(run_dir)
    assert not loaded.training
    items, lengths, _ = random_batch(6)
    torch.testing.assert_close(loaded.next_token_log_probs(items, lengths),
                               model.next_token_log_probs(items, lengths), rtol=0, atol=0)

    codes = model.item_codes.numpy().copy()
    codes[0, 0] = (codes[0, 0] + 1) % V
    write_semantic_ids(paths.semantic_ids, item_ids, codes)
    with pytest.raises(Exception, match="tokenizer_fingerprint"):
        load_model(run_dir)


def test_matches_the_paper_codes_transformers_gpt2_backbone():
    """Same weights in transformers' GPT2Model, driven the way the paper's code drives it
    (``inputs_embeds`` = mean of the item's token embeddings, padding mask, per-digit heads and
    cosine cross-entropy against the pad/eos-stripped ``wte``), give the same loss."""
    transformers = pytest.importorskip("transformers")
    model = tiny_model(11, n_layer=2)
    items, lengths, targets = random_batch(11)
    d, t = model.cfg.d_model, items.shape[1]
    hf = transformers.GPT2Model(transformers.GPT2Config(
        vocab_size=M * V + 2, n_positions=model.cfg.max_seq_len, n_embd=d, n_layer=model.cfg.n_layer,
        n_head=model.cfg.n_head, n_inner=model.cfg.d_ffn, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=model.cfg.layer_norm_eps,
        bos_token_id=M * V + 1, eos_token_id=M * V + 1,
    )).eval()
    with torch.no_grad():
        hf.wte.weight[1:-1] = model.token_embeddings.reshape(-1, d)  # token 0 = pad, last = eos
        hf.wpe.weight[:] = model.position_embeddings
        hf.ln_f.load_state_dict(model.ln_f.state_dict())
        for ours, theirs in zip(model.blocks, hf.h):
            theirs.ln_1.load_state_dict(ours.ln_1.state_dict())
            theirs.ln_2.load_state_dict(ours.ln_2.state_dict())
            # GPT-2's Conv1D stores (in, out): the transpose of nn.Linear's weight.
            for conv, linear in ((theirs.attn.c_attn, ours.qkv), (theirs.attn.c_proj, ours.attn_proj),
                                 (theirs.mlp.c_fc, ours.fc), (theirs.mlp.c_proj, ours.mlp_proj)):
                conv.weight[:] = linear.weight.t()
                conv.bias[:] = linear.bias
    real = torch.arange(t) < lengths[:, None]  # (B, T)
    tokens = model.item_codes[items.clamp(min=0)].long() + torch.arange(M) * V + 1  # (B, T, m)
    tokens = torch.where(real[..., None], tokens, 0)
    hidden = hf(inputs_embeds=hf.wte(tokens).mean(-2), attention_mask=real.long()).last_hidden_state
    labelled = targets.reshape(-1) != PAD
    states = torch.stack([hidden + F.silu(F.linear(hidden, model.head_weight[k], model.head_bias[k]))
                          for k in range(M)], -2)  # (B, T, m, d)
    states = F.normalize(states.reshape(-1, M, d)[labelled], dim=-1)  # (N, m, d)
    table = F.normalize(hf.wte.weight[1:-1], dim=-1).chunk(M, 0)
    codes = model.item_codes[targets.reshape(-1)[labelled]].long()  # (N, m)
    paper = torch.stack([F.cross_entropy(states[:, k] @ table[k].T / model.cfg.temperature, codes[:, k])
                         for k in range(M)]).mean()
    torch.testing.assert_close(model(items, lengths, targets), paper, rtol=1e-5, atol=1e-5)
