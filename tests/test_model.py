"""The model: parity with transformers, the lecture's init, the optimizer groups, the LR schedule, FLOPs, the KV cache,
and a forward pass that compiles into one graph."""
import math

import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel

from train_gpt2 import GPT, GPTConfig, UsageError, get_lr


def small_hf_model(seed=0, n_positions=64):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=50257, n_positions=n_positions, n_embd=48, n_layer=3, n_head=4)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random values everywhere: a transposed or swapped tensor shows in the logits
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def tiny_gpt(block_size=32, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)).eval()


def test_from_pretrained_local_dir_matches_transformers_logits(tmp_path):
    hf = small_hf_model()
    hf.save_pretrained(tmp_path / "hf")
    ours = GPT.from_pretrained(str(tmp_path / "hf")).eval()
    assert (ours.config.n_layer, ours.config.n_head, ours.config.n_embd, ours.config.block_size) == (3, 4, 48, 64)
    idx = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4


def test_to_hf_gives_the_same_logits_over_gpt2s_vocabulary():
    ours = tiny_gpt()
    hf = ours.to_hf().eval()
    assert hf.config.vocab_size == 50257  # the padding rows are not exported
    idx = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        assert (ours(idx)[0][..., :50257] - hf(idx).logits).abs().max().item() <= 1e-5


def test_from_pretrained_unknown_name_is_a_usage_error():
    with pytest.raises(UsageError, match="could not load no-such-user/no-such-model .*give a save_pretrained"):
        GPT.from_pretrained("no-such-user/no-such-model")  # (no hub here: a fast fail)


def test_lm_head_and_token_embedding_are_one_tensor():
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=1, n_embd=8))
    assert model.lm_head.weight is model.transformer.wte.weight


def test_init_statistics():
    torch.manual_seed(0)
    L = 6
    model = GPT(GPTConfig(block_size=256, vocab_size=4096, n_layer=L, n_head=4, n_embd=256))
    for block in model.transformer.h:
        for lin in (block.attn.c_attn, block.mlp.c_fc):
            assert lin.weight.std().item() == pytest.approx(0.02, rel=0.03)
            assert torch.all(lin.bias == 0)
        for lin in (block.attn.c_proj, block.mlp.c_proj):  # residual projections: scaled by (2*n_layer)**-0.5
            assert lin.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.03)
            assert torch.all(lin.bias == 0)
        for ln in (block.ln_1, block.ln_2):
            assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert model.transformer.wpe.weight.std().item() == pytest.approx(0.02, rel=0.03)


def test_one_seed_gives_the_lecture_order_of_initialisation():
    # The lecture builds wte, wpe, the blocks (ln_1, c_attn, c_proj, ln_2, c_fc, c_proj), ln_f, lm_head, ties wte to
    # lm_head, then re-initialises module by module in that order. Replay those RNG draws by hand.
    V, BS, L, C = 100, 16, 2, 8
    torch.manual_seed(1337)
    nn.Embedding(V, C), nn.Embedding(BS, C)  # construction draws (default inits), discarded later
    for _ in range(L):
        nn.LayerNorm(C), nn.Linear(C, 3 * C), nn.Linear(C, C), nn.LayerNorm(C), nn.Linear(C, 4 * C), nn.Linear(4 * C, C)
    nn.LayerNorm(C), nn.Linear(C, V, bias=False)
    expected = {}
    torch.empty(V, C).normal_(0, 0.02)  # wte's own init, later overwritten by lm_head's (the tied tensor)
    expected["transformer.wpe.weight"] = torch.empty(BS, C).normal_(0, 0.02)
    scaled = 0.02 * (2 * L) ** -0.5
    for i in range(L):
        expected[f"transformer.h.{i}.attn.c_attn.weight"] = torch.empty(3 * C, C).normal_(0, 0.02)
        expected[f"transformer.h.{i}.attn.c_proj.weight"] = torch.empty(C, C).normal_(0, scaled)
        expected[f"transformer.h.{i}.mlp.c_fc.weight"] = torch.empty(4 * C, C).normal_(0, 0.02)
        expected[f"transformer.h.{i}.mlp.c_proj.weight"] = torch.empty(C, 4 * C).normal_(0, scaled)
    expected["lm_head.weight"] = torch.empty(V, C).normal_(0, 0.02)
    torch.manual_seed(1337)
    sd = GPT(GPTConfig(block_size=BS, vocab_size=V, n_layer=L, n_head=2, n_embd=C)).state_dict()
    for k, v in expected.items():
        assert torch.equal(sd[k], v), k
    assert torch.equal(sd["transformer.wte.weight"], expected["lm_head.weight"])


def test_optimizer_groups_decay_only_matrices():
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=8))
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=6e-4, device_type="cpu", master_process=False)
    decay, nodecay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and nodecay["weight_decay"] == 0.0
    params = list(model.parameters())  # shared wte/lm_head counted once
    assert {id(p) for p in decay["params"]} == {id(p) for p in params if p.dim() >= 2}
    assert {id(p) for p in nodecay["params"]} == {id(p) for p in params if p.dim() < 2}
    assert len(decay["params"]) == 10  # 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj) + wte + wpe
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8 and opt.defaults["lr"] == 6e-4
    assert not opt.defaults.get("fused")  # fused AdamW is for CUDA


def test_lr_schedule_points():
    # the recipe: max_lr 6e-4, min_lr 6e-5, warmup 715, max_steps 19073
    assert get_lr(0) == pytest.approx(6e-4 / 715)
    assert get_lr(714) == pytest.approx(6e-4)  # the last warmup step reaches max_lr
    assert get_lr(715) == pytest.approx(6e-4)  # the cosine starts at its top
    assert get_lr((715 + 19073) // 2) == pytest.approx(3.3e-4, rel=1e-3)  # halfway: (max + min) / 2
    assert get_lr(19073) == pytest.approx(6e-5)
    assert get_lr(25000) == pytest.approx(6e-5)
    lrs = [get_lr(s) for s in range(715, 19074, 97)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_gpt2_124m_size_and_flops_per_token():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50304))
    assert sum(p.numel() for p in model.parameters()) == 124_475_904  # 124M with the padded vocab
    assert model.flops_per_token(1024) / 1e9 == pytest.approx(0.855, abs=0.001)  # the lecture's figure


def test_flops_per_token_agrees_with_torchs_flop_counter():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=50304, n_layer=2, n_head=4, n_embd=64))
    x = torch.randint(0, 50257, (2, 128))
    # the math backend: attention as plain matmuls, which the counter sees (it has no formula for the CPU kernel)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, x)[1].backward()
    measured = counter.get_total_flops() / x.numel()  # forward and backward, per token
    assert measured == pytest.approx(model.flops_per_token(128), rel=0.01)


def test_forward_compiles_into_one_graph_without_breaks():
    torch._dynamo.reset()
    model = tiny_gpt()
    x = torch.randint(0, 50257, (2, 32))
    explanation = torch._dynamo.explain(model)(x, x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_forward_rejects_sequences_longer_than_block_size():
    model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(AssertionError, match="block size"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_loss_is_cross_entropy_of_the_logits():
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=8))
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    logits, loss = model(idx, targets)
    manual = -torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)


def test_non_contiguous_inputs_and_targets_give_the_same_loss():
    model = tiny_gpt()
    buf = torch.randint(0, 50257, (16, 4))
    idx, targets = buf[:, :2].t(), buf[:, 2:].t()  # (2, 16) views with strides that .view cannot flatten
    assert not idx.is_contiguous() and not targets.is_contiguous()
    with torch.no_grad():
        assert model(idx, targets)[1].item() == model(idx.contiguous(), targets.contiguous())[1].item()


def uncached_greedy(model, idx, max_length):
    """Greedy decoding with the plain forward over the whole (cropped) sequence at every step."""
    with torch.no_grad():
        while idx.size(1) < max_length:
            logits, _ = model(idx[:, -model.config.block_size:])
            idx = torch.cat([idx, logits[:, -1, :50257].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("prompt_len, max_length", [(3, 20), (29, 32), (5, 80)],
                         ids=["short prompt", "prompt near block_size", "across the crop"])
def test_kv_cache_gives_the_tokens_of_the_uncached_forward(prompt_len, max_length):
    model = tiny_gpt(block_size=32)
    with torch.no_grad():  # positions that matter, and sharp logits without near ties: a wrong cache shows
        model.transformer.wpe.weight.normal_(0.0, 1.0)
        model.transformer.ln_f.weight.mul_(8)
    prompt = torch.randint(0, 50257, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    expected = uncached_greedy(model, prompt, max_length)
    assert torch.equal(model.generate(prompt, max_length, top_k=1), expected)


def test_sampling_with_the_cache_matches_sampling_without_it():
    model = tiny_gpt(block_size=32)
    prompt = torch.randint(0, 50257, (3, 4), generator=torch.Generator().manual_seed(0))
    cached = model.generate(prompt, 50, top_k=50, generator=torch.Generator().manual_seed(7))
    idx, rng = prompt, torch.Generator().manual_seed(7)  # the same top-k draws, uncached
    with torch.no_grad():
        while idx.size(1) < 50:
            probs = torch.softmax(model(idx[:, -32:])[0][:, -1, :50257], -1)
            topk_probs, topk_indices = torch.topk(probs, 50, dim=-1)
            idx = torch.cat([idx, torch.gather(topk_indices, -1, torch.multinomial(topk_probs, 1, generator=rng))], 1)
    assert torch.equal(cached, idx)
