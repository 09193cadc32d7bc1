"""
The memory a GPU needs to train GPT-2 (124M to 1558M) under DDP or FSDP, with and without activation checkpointing,
planned from measurements on the CPU, and the largest micro-batch B that fits 24, 40 and 80 GB cards.

    python tools/memory_plan.py            # the table for the four GPT-2s (a minute or two on a CPU)
    python tools/memory_plan.py --quick    # one small width, and the self-check (what the tests run)

Measured with train_gpt2's GPT on the CPU:
- state: the bytes a parameter of weights, gradients and AdamW's moments, summed from the tensors after a real step;
- activations: the bytes a token that autograd keeps for backward, counted by torch.autograd.graph.saved_tensors_hooks
  (each storage once), at each model's width, under bf16 autocast as GPUs train (float32 for the self-check): with 0
  and 1 blocks, so per block and for the rest (embeddings, the head, the loss). With activation checkpointing a block
  keeps only its input, which the checkpoint holds where the hooks do not see it: n_embd float32 values a token.
Planned per GPU: the state (DDP: all of it; FSDP over 8 GPUs: 1/8, plus the unsharded weights of the root unit and of
two blocks, the one computing and the one fetched next, and as much again for their gradients before the
reduce-scatter) + B*T*activations a token (with checkpointing: the blocks' inputs, and one block's activations while it
is recomputed) + the logits' gradient in backward (float32, and its bf16 copy under autocast) + 1 GiB for CUDA's context
and workspaces (an allowance, not a measurement). It is a plan, not a GPU measurement.
Self-check: the plan of one float32 training step of a small model against the step's measured peak on this CPU.
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


def state_bytes_per_parameter():
    """Weights, gradients and AdamW's moments after one real step, over the parameter count."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=V, n_layer=2, n_head=2, n_embd=64))
    optimizer = model.configure_optimizers(0.1, 1e-3, "cpu", master_process=False)
    x = torch.randint(0, V, (2, 32))
    model(x, x)[1].backward()
    optimizer.step()
    tensors = [t for p in model.parameters() for t in (p, p.grad)]
    tensors += [t for state in optimizer.state.values() for t in state.values()]
    held = {t.data_ptr(): t.numel() * t.element_size() for t in tensors}  # (a shared tensor, once)
    return sum(held.values()) / sum(p.numel() for p in model.parameters())


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


def measure(n_head, n_embd, T, dtype):
    """Bytes autograd keeps: (a token for the rest, a token a block, a token a checkpointed block, a parameter a
    forward): the slope from B=1 to B=2, and what does not grow with B (autocast's copies of the weights)."""
    torch.manual_seed(0)
    no_block, one_block = (GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=n, n_head=n_head, n_embd=n_embd))
                           for n in (0, 1))

    def per_token(model, checkpointing):
        model.activation_checkpointing = checkpointing
        one, two = (kept(model, B, T, dtype) for B in (1, 2))
        return (two - one) / T, 2 * one - two
    rest, rest_fixed = per_token(no_block, False)
    block, block_fixed = per_token(one_block, False)
    checkpointed, _ = per_token(one_block, True)
    copies = (block_fixed - rest_fixed) / (12 * n_embd**2 + 13 * n_embd)  # (bytes a block parameter)
    return rest, block - rest, checkpointed - rest + 4 * n_embd, copies  # (checkpointed: + the input it holds)


def parameters(n_layer, n_embd):
    block = 12 * n_embd**2 + 13 * n_embd
    root = V * n_embd + 1024 * n_embd + 2 * n_embd  # wte (tied to lm_head), wpe, ln_f
    return root + n_layer * block, root, block


def plan(size, fsdp, checkpointing, B, measured, per_parameter, T=1024, logits_bytes=6):
    """Bytes a GPU needs: state, FSDP's unsharded working set, activations, the logits' gradient, CUDA's context."""
    n_layer, _, n_embd = SIZES[size]
    total, root, block = parameters(n_layer, n_embd)
    rest, per_block, per_checkpointed, copies = measured[n_embd]
    state = per_parameter * total / (GPUS if fsdp else 1)
    working = 2 * 4 * (root + 2 * block) if fsdp else 0  # (float32 weights and their gradients, unsharded)
    activations = B * T * (rest + n_layer * (per_checkpointed if checkpointing else per_block))
    weight_copies = copies * block * (1 if checkpointing else n_layer)  # (autocast's, kept to backward; recomputed)
    if checkpointing:
        activations += B * T * per_block  # (one block recomputed in backward)
    return state + working + activations + weight_copies + B * T * V * logits_bytes + CONTEXT


def largest_B(size, fsdp, checkpointing, measured, per_parameter, card):
    fits = [B for B in BATCHES + [128] if plan(size, fsdp, checkpointing, B, measured, per_parameter) <= card * 1e9]
    return max(fits) if fits else None


STEP = """
import json, resource, sys, torch
sys.path.insert(0, {root!r})
from train_gpt2 import GPT, GPTConfig
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
base = rss()
torch.manual_seed(0)
model = GPT(GPTConfig(block_size={T}, vocab_size={V}, n_layer={n_layer}, n_head={n_head}, n_embd={n_embd}))
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


def self_check(per_parameter, n_layer=4, n_head=4, n_embd=256, B=8, T=256):
    """The plan of a float32 step of a small model (one process: DDP's formula, no CUDA context) against its peak."""
    rest, per_block, _, _ = measure(n_head, n_embd, T, torch.float32)
    total = parameters(n_layer, n_embd)[0] - 1024 * n_embd + T * n_embd  # (this model's context: T)
    predicted = per_parameter * total + B * T * (rest + n_layer * per_block) + B * T * V * 8  # (float32 logits' grads)
    code = STEP.format(root=ROOT, T=T, V=V, n_layer=n_layer, n_head=n_head, n_embd=n_embd, B=B)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")  # (large frees go back to the OS)
    measured = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                         check=True).stdout)
    return predicted, measured


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="gpt2 alone, measured at T=64, and a smaller self-check")
    args = p.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    per_parameter = state_bytes_per_parameter()
    print(f"state: {per_parameter:.2f} bytes a parameter (float32 weights, gradients, AdamW's two moments)")
    sizes = ["gpt2"] if args.quick else list(SIZES)
    T = 64 if args.quick else 256  # (flash attention keeps O(T) a token: the bytes a token do not depend on T)
    measured = {}
    for size in sizes:
        _, n_head, n_embd = SIZES[size]
        measured[n_embd] = measure(n_head, n_embd, T, torch.bfloat16)
        rest, block, checkpointed, copies = measured[n_embd]
        print(f"{size} (width {n_embd}), bf16 autocast: a token keeps {block / 1024:.1f} KiB a block "
              f"({checkpointed / 1024:.1f} KiB checkpointed) and {rest / 1024:.1f} KiB for the rest; a forward keeps "
              f"{copies:.2f} bytes a block parameter (autocast's bf16 copies of the weights)")
    print(f"\nGB per GPU (1e9 bytes), planned, T=1024; FSDP over {GPUS} GPUs; a plan from CPU measurements, not a GPU "
          f"measurement")
    print("| model | how | " + " | ".join(f"B={B}" for B in BATCHES) + " | largest B: 24 GB | 40 GB | 80 GB |")
    print("| --- | --- |" + " --- |" * (len(BATCHES) + 3))
    for size in sizes:
        for fsdp in (False, True):
            for checkpointing in (False, True):
                how = ("FSDP" if fsdp else "DDP") + (" + AC" if checkpointing else "")
                cells = [f"{plan(size, fsdp, checkpointing, B, measured, per_parameter) / 1e9:.1f}" for B in BATCHES]
                fits = [largest_B(size, fsdp, checkpointing, measured, per_parameter, card) for card in (24, 40, 80)]
                print(f"| {size} | {how} | " + " | ".join(cells) + " | "
                      + " | ".join(str(b) if b else "-" for b in fits) + " |")
    print("\nThe largest B on an 80 GB GPU (the presets': DDP's for gpt2-medium and -large, FSDP's for gpt2-xl):")
    for size in sizes:
        ddp, fsdp = (largest_B(size, sharded, False, measured, per_parameter, 80) for sharded in (False, True))
        print(f"  {size}: DDP {ddp}, FSDP {fsdp}")
    shape = dict(n_layer=2, B=2, T=128) if args.quick else dict(n_layer=4, B=8, T=256)
    predicted, measured_peak = self_check(per_parameter, **shape)
    ratio = predicted / measured_peak
    print(f"\nself-check, a float32 step of {shape['n_layer']} layers x 256 wide, B={shape['B']}, T={shape['T']} on "
          f"this CPU: planned {predicted / 2**20:.0f} MiB, measured peak {measured_peak / 2**20:.0f} MiB "
          f"({ratio:.2f}x)")
    if not 0.85 <= ratio <= 1.15:
        sys.exit("memory_plan.py: error: the plan is more than 15% off the measured peak")


if __name__ == "__main__":
    main()
