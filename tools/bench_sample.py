"""
Generation speed with GPT.generate's KV cache against the lecture's loop (the whole sequence through the model
for every new token), side by side, for a tiny GPT and for GPT-2 124M.

    python tools/bench_sample.py                          # on the CPU
    python tools/bench_sample.py --device cuda --runs 5

Random weights (the time does not depend on them). Each model generates --new_tokens tokens after an 8-token
prompt, --num_samples rows at once, --runs times per path, alternating; the medians are printed side by side, and
whether the two paths gave the same tokens (same seed, top-k sampling).
"""

import argparse
import os
import statistics
import sys
import time

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train_gpt2 import GPT, GPTConfig  # noqa: E402

MODELS = {"tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=256), "124M": dict()}


@torch.no_grad()
def lecture_generate(model, idx, max_length, generator, top_k=50):
    """The lecture's sampling loop: no cache."""
    while idx.size(1) < max_length:
        logits, _ = model(idx[:, -model.config.block_size:])
        probs = F.softmax(logits[:, -1, :50257].float(), dim=-1)
        topk_probs, topk_indices = torch.topk(probs, top_k, dim=-1)
        ix = torch.multinomial(topk_probs, 1, generator=generator)
        idx = torch.cat((idx, torch.gather(topk_indices, -1, ix)), dim=1)
    return idx


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    device = args.device
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"{device} ({os.cpu_count()} CPUs)"
    print(f"{name}, torch {torch.__version__}, float32, {args.new_tokens} new tokens after 8, {args.num_samples} "
          f"row(s), {args.runs} runs each, alternating")
    for key in args.models:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=50304, **MODELS[key])).to(device).eval()
        prompt = torch.randint(0, 50257, (args.num_samples, 8), device=device)
        max_length = 8 + args.new_tokens
        paths = {"no cache": lambda g: lecture_generate(model, prompt, max_length, g),
                 "KV cache": lambda g: model.generate(prompt, max_length, generator=g)}
        times, tokens = {k: [] for k in paths}, {}
        for k, fn in paths.items():  # warm-up
            fn(torch.Generator(device).manual_seed(0))
        for i in range(args.runs):
            for k in list(paths) if i % 2 == 0 else list(paths)[::-1]:
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                tokens[k] = paths[k](torch.Generator(device).manual_seed(42))
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[k].append(time.perf_counter() - t0)
        slow, fast = (args.new_tokens * args.num_samples / statistics.median(times[k]) for k in paths)
        same = torch.equal(tokens["no cache"], tokens["KV cache"])
        print(f"{key:>5}: median tokens/s   no cache {slow:,.1f}   KV cache {fast:,.1f}   speed-up {fast / slow:.2f}x"
              f"   same tokens: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
