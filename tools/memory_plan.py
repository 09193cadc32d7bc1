"""
The memory a GPU needs to train GPT-2 (124M to 1558M) under DDP or FSDP, with and without activation checkpointing,
planned from measurements on the CPU, and the largest micro-batch B that fits 24, 40 and 80 GB cards; and to fine-tune
it with LoRA (--lora_rank 8), with and without activation checkpointing, on 8, 12, 16 and 24 GB cards.

    python tools/memory_plan.py            # the tables for the four GPT-2s (minutes on a CPU: 9 on 2 cores)
    python tools/memory_plan.py --quick    # one small width, and the self-check (what the tests run)

Measured with train_gpt2's GPT on the CPU:
- state: the bytes a parameter of weights, gradients and AdamW's moments, summed from the tensors after a real step;
- activations: the bytes a token that autograd keeps for backward, counted by torch.autograd.graph.saved_tensors_hooks
  (each storage once), at each model's width, under bf16 autocast as GPUs train (float32 for the self-check): with 1
  and 2 blocks, so per block and for the rest (embeddings, the head, the loss). With activation checkpointing a block
  keeps only its input, which the checkpoint saves for backward (the hooks count it).
- LoRA (GPT.add_lora at rank 8, the frozen weights cast to bf16 as train() casts them): the bytes a frozen parameter
  (2: bf16, no gradient, no AdamW state) and an adapter parameter (16, as above) after a real step under bf16 autocast;
  the activations as above, of the LoRA model. They differ from full training's: a frozen Linear keeps no input for its
  weight's gradient, but its adapter keeps the same one for A's; the residual stream is bf16, as the frozen embeddings
  are; autocast copies only the adapters (2 bytes an adapter parameter), the frozen weights being bf16 already; and the
  first block keeps less than the others (its input needs no gradient), hence the second block is the one measured.
Planned per GPU: the state (DDP: all of it; FSDP over 8 GPUs: 1/8, plus the unsharded weights of the root unit and of
two blocks, the one computing and the one fetched next, and as much again for their gradients before the
reduce-scatter; LoRA, under DDP: the frozen weights and the adapters' state, the same on every GPU) + B*T*activations a
token (with checkpointing: the blocks' inputs, and one block's activations while it is recomputed) + autocast's copies
kept to backward + the logits' gradient in backward (float32, and its bf16 copy under autocast) + 1 GiB for CUDA's
context and workspaces (an allowance, not a measurement). It is a plan, not a GPU measurement.
Self-check: the plan of one float32 training step of a small model against the step's measured peak on this CPU (and
without --quick, of a float32 LoRA step: a CPU's bf16 matmuls hold memory of their own that a GPU's do not).
"""

import argparse
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from train_gpt2 import GPT, GPTConfig  # noqa: E402

SIZES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}
V = 50304  # the padded vocabulary
CONTEXT = 2**30  # CUDA's context and workspaces: an allowance
GPUS = 8  # FSDP's world size in the plan
BATCHES = [1, 2, 4, 8, 16, 32, 64]
RANK = 8  # LoRA's rank in the plan (--lora_rank 8)
LORA_CARDS = [8, 12, 16, 24]  # GB: the cards LoRA is for


def hold_as_lora_trains(model, rank, dtype):
    """add_lora, then the frozen weights in the compute dtype, as train() holds them (bf16: 2 bytes a parameter)."""
    model.add_lora(rank, 16.0)
    for p in [p for p in model.parameters() if not p.requires_grad]:
        p.data = p.data.to(dtype)
    return model


def one_step(model, dtype):
    """A real training step of a small model (under autocast unless float32); its optimizer, AdamW's moments made."""
    optimizer = model.configure_optimizers(0.1, 1e-3, "cpu", master_process=False)
    x = torch.randint(0, V, (2, 32))
    with torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
        loss = model(x, x)[1]
    loss.backward()
    optimizer.step()
    return optimizer


def held_per_parameter(params, optimizer):
    """The bytes of these parameters, their gradients and their AdamW state, over their count (a shared tensor once)."""
    tensors = [t for p in params for t in (p, p.grad, *optimizer.state.get(p, {}).values()) if torch.is_tensor(t)]
    held = {t.data_ptr(): t.numel() * t.element_size() for t in tensors}
    return sum(held.values()) / sum(p.numel() for p in params)


def small_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, vocab_size=V, n_layer=2, n_head=2, n_embd=64))


def state_bytes_per_parameter():
    """Weights, gradients and AdamW's moments after one real step, over the parameter count."""
    model = small_gpt()
    optimizer = one_step(model, torch.float32)
    return held_per_parameter(list(model.parameters()), optimizer)


def lora_state_bytes_per_parameter(rank, dtype=torch.bfloat16):
    """(a frozen parameter, an adapter parameter): the bytes each holds after one real LoRA step in dtype (bf16: under
    autocast, as GPUs train), the frozen weights in dtype as train() casts them."""
    model = hold_as_lora_trains(small_gpt(), rank, dtype)
    optimizer = one_step(model, dtype)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    adapters = [p for p in model.parameters() if p.requires_grad]
    return held_per_parameter(frozen, optimizer), held_per_parameter(adapters, optimizer)


def kept(model, B, T, dtype):
    """The bytes autograd keeps for backward in a training forward of B x T tokens (the parameters' own storages
    aside: the state counts them)."""
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    x = torch.randint(0, V, (B, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
            model(x, x)
    return sum(storages.values())


def measure(n_head, n_embd, T, dtype, lora_rank=0):
    """Bytes autograd keeps: (a token for the rest, a token a block, a token a checkpointed block, a block's bytes a
    forward): the slope from B=1 to B=2, and what does not grow with B (autocast's copies of the weights), of models
    of 1 and 2 blocks (the second block is the one measured: a LoRA model's first block keeps less, its input needs
    no gradient). lora_rank: adapters added and the frozen weights cast to dtype, as train() does."""
    torch.manual_seed(0)
    models = [GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=n, n_head=n_head, n_embd=n_embd)) for n in (1, 2)]
    if lora_rank:
        for model in models:
            hold_as_lora_trains(model, lora_rank, dtype)

    def per_token(model, checkpointing):
        model.activation_checkpointing = checkpointing
        one, two = (kept(model, B, T, dtype) for B in (1, 2))
        return (two - one) / T, 2 * one - two
    (one_block, one_fixed), (two_blocks, two_fixed) = (per_token(model, False) for model in models)
    block = two_blocks - one_block
    (one_checkpointed, _), (two_checkpointed, _) = (per_token(model, True) for model in models)
    # (a checkpointed block keeps its input alone: the checkpoint saves it for backward, and the hooks count it)
    return one_block - block, block, two_checkpointed - one_checkpointed, two_fixed - one_fixed


def parameters(n_layer, n_embd):
    block = 12 * n_embd**2 + 13 * n_embd
    root = V * n_embd + 1024 * n_embd + 2 * n_embd  # wte (tied to lm_head), wpe, ln_f
    return root + n_layer * block, root, block


def adapter_parameters(n_embd, rank):
    """A block's adapters: A (rank x in) and B (out x rank) beside c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj."""
    C = n_embd
    return rank * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))


def activation_bytes(n_layer, checkpointing, B, T, measured):
    """What a training forward keeps to backward: B*T*activations a token, and autocast's copies of the weights."""
    rest, per_block, per_checkpointed, fixed = measured
    activations = B * T * (rest + n_layer * (per_checkpointed if checkpointing else per_block))
    if checkpointing:
        activations += B * T * per_block  # (one block recomputed in backward)
    return activations + fixed * (1 if checkpointing else n_layer)  # (autocast's copies, kept to backward; recomputed)


def plan(size, fsdp, checkpointing, B, measured, per_parameter, T=1024, logits_bytes=6):
    """Bytes a GPU needs: state, FSDP's unsharded working set, activations, the logits' gradient, CUDA's context."""
    n_layer, _, n_embd = SIZES[size]
    total, root, block = parameters(n_layer, n_embd)
    state = per_parameter * total / (GPUS if fsdp else 1)
    working = 2 * 4 * (root + 2 * block) if fsdp else 0  # (float32 weights and their gradients, unsharded)
    activations = activation_bytes(n_layer, checkpointing, B, T, measured[n_embd])
    return state + working + activations + B * T * V * logits_bytes + CONTEXT


def lora_plan(size, checkpointing, B, lora_measured, lora_per_parameter, T=1024, logits_bytes=6):
    """Bytes a GPU needs to fine-tune with LoRA (DDP: every GPU the same): the frozen weights, the adapters' state,
    activations, the logits' gradient, CUDA's context."""
    n_layer, _, n_embd = SIZES[size]
    frozen_bytes, adapter_bytes = lora_per_parameter
    state = frozen_bytes * parameters(n_layer, n_embd)[0] + adapter_bytes * n_layer * adapter_parameters(n_embd, RANK)
    activations = activation_bytes(n_layer, checkpointing, B, T, lora_measured[n_embd])
    return state + activations + B * T * V * logits_bytes + CONTEXT


def largest_B(planned, card):
    """The largest B whose planned bytes ({B: bytes}) fit a card of `card` GB, or None."""
    fits = [B for B, need in planned.items() if need <= card * 1e9]
    return max(fits) if fits else None


STEP = """
import json, sys, torch
sys.path.insert(0, {root!r})
sys.path.insert(0, {tools!r})
from memory_plan import hold_as_lora_trains
from train_gpt2 import GPT, GPTConfig
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
base = rss()
torch.manual_seed(0)
model = GPT(GPTConfig(block_size={T}, vocab_size={V}, n_layer={n_layer}, n_head={n_head}, n_embd={n_embd}))
if {lora_rank}:
    hold_as_lora_trains(model, {lora_rank}, torch.float32)
optimizer = model.configure_optimizers(0.1, 1e-3, "cpu", master_process=False)
x = torch.randint(0, {V}, ({B}, {T}))
for step in range(2):  # the first makes AdamW's moments; the second is measured
    optimizer.zero_grad(set_to_none=True)
    if step == 1:
        open("/proc/self/clear_refs", "w").write("5")  # (the peak resident size starts again from now)
    model(x, x)[1].backward()
    optimizer.step()
peak = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
print(json.dumps(peak - base))
"""


def self_check(state_bytes, n_layer=4, n_head=4, n_embd=256, B=8, T=256, lora_rank=0):
    """The plan of a float32 step of a small model (one process: DDP's formula, no CUDA context) against its measured
    peak. lora_rank: a LoRA step, state_bytes (a frozen parameter's, an adapter parameter's), float32 too (a CPU's bf16
    matmuls take memory and time of their own, which a GPU's do not)."""
    total = parameters(n_layer, n_embd)[0] - 1024 * n_embd + T * n_embd  # (this model's context: T)
    if lora_rank:
        state = state_bytes[0] * total + state_bytes[1] * n_layer * adapter_parameters(n_embd, lora_rank)
    else:
        state = state_bytes * total
    activations = activation_bytes(n_layer, False, B, T, measure(n_head, n_embd, T, torch.float32, lora_rank))
    predicted = state + activations + B * T * V * 8  # (float32 logits' gradients)
    code = STEP.format(root=ROOT, tools=os.path.join(ROOT, "tools"), T=T, V=V, n_layer=n_layer, n_head=n_head,
                       n_embd=n_embd, B=B, lora_rank=lora_rank)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")  # (large frees go back to the OS)
    measured = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                         check=True).stdout)
    return predicted, measured


def print_lora_table(sizes, lora_measured, lora_per_parameter):
    print(f"\nLoRA fine-tuning at rank {RANK} (--lora_rank {RANK}: adapters beside each block's four Linears, all else "
          f"frozen in bf16), GB per GPU (1e9 bytes), planned, T=1024; under DDP every GPU holds the same, so a row is "
          f"per GPU on any number of them; the largest B of {BATCHES[0]} to {BATCHES[-1]}")
    print("| model | how | " + " | ".join(f"B={B}" for B in BATCHES) + " | largest B: "
          + " | ".join(f"{card} GB" for card in LORA_CARDS) + " |")
    print("| --- | --- |" + " --- |" * (len(BATCHES) + len(LORA_CARDS)))
    for size in sizes:
        for checkpointing in (False, True):
            how = f"LoRA r={RANK}" + (" + AC" if checkpointing else "")
            planned = {B: lora_plan(size, checkpointing, B, lora_measured, lora_per_parameter) for B in BATCHES}
            cells = [f"{planned[B] / 1e9:.1f}" for B in BATCHES]
            fits = [largest_B(planned, card) for card in LORA_CARDS]
            print(f"| {size} | {how} | " + " | ".join(cells) + " | "
                  + " | ".join(str(b) if b else "-" for b in fits) + " |")
    adapters = [f"{size} {SIZES[size][0] * adapter_parameters(SIZES[size][2], RANK) / 1e6:.1f}M" for size in sizes]
    print(f"The adapters at rank {RANK}: " + ", ".join(adapters) + " parameters")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="gpt2 alone, measured at T=16, and a smaller self-check")
    args = p.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    per_parameter = state_bytes_per_parameter()
    print(f"state: {per_parameter:.2f} bytes a parameter (float32 weights, gradients, AdamW's two moments)")
    lora_per_parameter = lora_state_bytes_per_parameter(RANK)
    print(f"LoRA r={RANK} state: {lora_per_parameter[0]:.2f} bytes a frozen parameter (bf16 weights, no gradient, no "
          f"AdamW state), {lora_per_parameter[1]:.2f} bytes an adapter parameter (float32 weights, gradients, "
          f"AdamW's two moments)")
    sizes = ["gpt2"] if args.quick else list(SIZES)
    T = 16 if args.quick else 256  # (flash attention keeps O(T) a token: the bytes a token do not depend on T)
    measured = {}
    lora_measured = {}
    for size in sizes:
        _, n_head, n_embd = SIZES[size]
        measured[n_embd] = measure(n_head, n_embd, T, torch.bfloat16)
        rest, block, checkpointed, fixed = measured[n_embd]
        print(f"{size} (width {n_embd}), bf16 autocast: a token keeps {block / 1024:.1f} KiB a block "
              f"({checkpointed / 1024:.1f} KiB checkpointed) and {rest / 1024:.1f} KiB for the rest; a forward keeps "
              f"{fixed / parameters(1, n_embd)[2]:.2f} bytes a block parameter (autocast's bf16 copies of the weights)")
        lora_measured[n_embd] = measure(n_head, n_embd, T, torch.bfloat16, RANK)
        rest, block, checkpointed, fixed = lora_measured[n_embd]
        print(f"{size} (width {n_embd}), LoRA r={RANK}, bf16 autocast, bf16 frozen weights: a token keeps "
              f"{block / 1024:.1f} KiB a block ({checkpointed / 1024:.1f} KiB checkpointed) and {rest / 1024:.1f} KiB "
              f"for the rest; a forward keeps {fixed / adapter_parameters(n_embd, RANK):.2f} bytes an adapter "
              f"parameter (autocast's bf16 copies of the adapters)")
    print(f"\nGB per GPU (1e9 bytes), planned, T=1024; FSDP over {GPUS} GPUs; a plan from CPU measurements, not a GPU "
          f"measurement")
    print("| model | how | " + " | ".join(f"B={B}" for B in BATCHES) + " | largest B: 24 GB | 40 GB | 80 GB |")
    print("| --- | --- |" + " --- |" * (len(BATCHES) + 3))
    for size in sizes:
        for fsdp in (False, True):
            for checkpointing in (False, True):
                how = ("FSDP" if fsdp else "DDP") + (" + AC" if checkpointing else "")
                planned = {B: plan(size, fsdp, checkpointing, B, measured, per_parameter) for B in BATCHES + [128]}
                cells = [f"{planned[B] / 1e9:.1f}" for B in BATCHES]
                fits = [largest_B(planned, card) for card in (24, 40, 80)]
                print(f"| {size} | {how} | " + " | ".join(cells) + " | "
                      + " | ".join(str(b) if b else "-" for b in fits) + " |")
    print("\nThe largest B on an 80 GB GPU (the presets': DDP's for gpt2-medium and -large, FSDP's for gpt2-xl):")
    for size in sizes:
        ddp, fsdp = (largest_B({B: plan(size, sharded, False, B, measured, per_parameter) for B in BATCHES + [128]},
                               80) for sharded in (False, True))
        print(f"  {size}: DDP {ddp}, FSDP {fsdp}")
    print_lora_table(sizes, lora_measured, lora_per_parameter)
    shape = dict(n_layer=2, B=2, T=128) if args.quick else dict(n_layer=4, B=8, T=256)
    checks = [("float32", per_parameter, 0)]
    if not args.quick:  # (a LoRA step holds less, so the allocator's and libraries' own memory weighs more in a small
        # one: it is checked at the full size, in float32 as well; its bf16 state is the measured one above)
        checks.append((f"float32 LoRA r={RANK}", lora_state_bytes_per_parameter(RANK, torch.float32), RANK))
    for what, state_bytes, lora_rank in checks:
        predicted, measured_peak = self_check(state_bytes, **shape, lora_rank=lora_rank)
        ratio = predicted / measured_peak
        print(f"\nself-check, a {what} step of {shape['n_layer']} layers x 256 wide, B={shape['B']}, T={shape['T']} on "
              f"this CPU: planned {predicted / 2**20:.0f} MiB, measured peak {measured_peak / 2**20:.0f} MiB "
              f"({ratio:.2f}x)")
        if not 0.85 <= ratio <= 1.15:
            sys.exit("memory_plan.py: error: the plan is more than 15% off the measured peak")


if __name__ == "__main__":
    main()
