"""
hellaswag.py's batched scoring against the lecture's loop (one example, 4 rows, per forward pass), side by side.

    python tools/bench_hellaswag.py                                   # a small GPT on the CPU, 200 examples
    python tools/bench_hellaswag.py --device cuda --n_layer 12 --n_head 12 --n_embd 768 --examples 2000 --compile

The examples are made up (random words at HellaSwag's lengths: contexts of 40-80 words, endings of 20-40), so the
benchmark needs no download; the model has random weights, which cost the same time as trained ones. Each path
runs --runs times, alternating, after an untimed warm-up (with --compile, one batch per length bucket: every graph
torch.compile builds); the medians are printed side by side, and whether the two paths pick the same endings.
"""

import argparse
import os
import random
import statistics
import sys
import time

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hellaswag  # noqa: E402
from train_gpt2 import GPT, GPTConfig  # noqa: E402

WORDS = ("the a man woman girl boy dog he she they then is are was takes puts holds walks runs jumps slowly "
         "quickly into onto over under around his her their ball rope water table floor kitchen field camera "
         "bike car knife bowl hair hands again back down up next while after and with").split()


def synthetic_examples(n, seed=0):
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))
    return [{"ctx": words(rng.randint(40, 80)).capitalize() + ".", "label": rng.randrange(4),
             "endings": [words(rng.randint(20, 40)) + "." for _ in range(4)]} for _ in range(n)]


@torch.no_grad()
def lecture_loop(model, examples, device, dtype):
    """The lecture's evaluation: render_example, one forward over its 4 rows, the loss at every position, masked
    to the ending; the summed and mean losses, (2, N, 4) like hellaswag.score."""
    out = torch.zeros((2, len(examples), 4))
    for i, example in enumerate(examples):
        _, tokens, mask, _ = hellaswag.render_example(example)
        tokens, mask = tokens.to(device), mask.to(device)
        with torch.autocast(torch.device(device).type, dtype, enabled=dtype is not None):
            logits = model(tokens)[0]
        shift_logits, shift_tokens = logits[:, :-1, :].float(), tokens[:, 1:]
        losses = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_tokens.reshape(-1),
                                 reduction="none").view(tokens.size(0), -1)
        shift_mask = mask[:, 1:]
        sums = (losses * shift_mask).sum(1)
        out[0, i], out[1, i] = sums.cpu(), (sums / shift_mask.sum(1)).cpu()
    return out


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--examples", type=int, default=200)
    p.add_argument("--batch_size", type=int, help="examples per forward (default: hellaswag.py's, 32 on CUDA, 8 else)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile the batched path, as training does")
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=256)
    args = p.parse_args()
    torch.manual_seed(0)
    device = args.device
    model = GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, vocab_size=50304))
    model.to(device).eval()
    dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported(False) else None
    examples = synthetic_examples(args.examples)
    batch_size = args.batch_size or (32 if device.startswith("cuda") else 8)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"{device} ({os.cpu_count()} CPUs)"
    print(f"{len(examples)} synthetic examples, batch {batch_size}, GPT n_layer={args.n_layer} n_embd={args.n_embd}, "
          f"{name}, dtype {dtype or torch.float32}, torch {torch.__version__}, {args.runs} runs each, alternating")

    batched = lambda: hellaswag.score(model, examples, device, batch_size, model.config.block_size, dtype, args.compile)
    lecture_loop(model, examples[:1], device, dtype)  # warm-up
    batched()  # warm-up: with --compile, every length bucket's graph
    times, results = {"lecture loop": [], "batched": []}, {}
    for i in range(args.runs):
        for path in ("lecture loop", "batched") if i % 2 == 0 else ("batched", "lecture loop"):
            sync(device)
            t0 = time.perf_counter()
            if path == "batched":
                results[path] = batched()
            else:
                results[path] = lecture_loop(model, examples, device, dtype)
            sync(device)
            times[path].append(time.perf_counter() - t0)
            print(f"  run {i + 1} {path:>12}: {len(examples) / times[path][-1]:,.1f} examples/s")
    lecture, ours = (statistics.median(times[k]) for k in ("lecture loop", "batched"))
    picks = [results[k].argmin(-1) for k in ("lecture loop", "batched")]
    same = int((picks[0] == picks[1]).all(0).sum())
    diff = (results["lecture loop"][1] - results["batched"][1]).abs().max().item()
    print(f"median examples/s   lecture loop {len(examples) / lecture:,.1f}   batched {len(examples) / ours:,.1f}   "
          f"speed-up {lecture / ours:.2f}x   same picks (acc and acc_norm) {same}/{len(examples)}, largest mean-loss "
          f"difference {diff:.1e}")


if __name__ == "__main__":
    main()
