"""
A LoRA step against a full fine-tuning step of the same model, side by side: GPT-2 124M's shape from scratch, B=2,
T=128 (one micro step a step), float32, on this machine's CPU.

    python tools/bench_lora.py
    python tools/bench_lora.py --runs 5 --steps 8

Each run is `python train_gpt2.py --benchmark <steps>` in a process of its own (the JSON line it prints: ms_per_step,
the median of the steps after the first fifth, and state_gib_per_rank), full and `--lora_rank 8` alternating, --runs
times each; the medians are printed side by side, and the ratio LoRA/full. float32: on a CPU train() keeps the frozen
weights in float32 too, so the state saved is the gradients' and AdamW's of the frozen weights.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--preset", "gpt2", "--n_layer", "12", "--n_head", "12", "--n_embd", "768", "--block_size", "1024", "--B", "2",
       "--T", "128", "--total_batch_size", "256", "--device", "cpu", "--dtype", "float32", "--compile", "0",
       "--hellaswag", "0"]


def benchmark(flags, steps, log_dir):
    """One run of train_gpt2.py --benchmark: its JSON line."""
    cmd = [sys.executable, os.path.join(ROOT, "train_gpt2.py"), *RUN, "--data", os.path.join(ROOT, "input.txt"),
           "--log_dir", log_dir, "--benchmark", str(steps), *flags]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=log_dir)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode or not lines:
        sys.exit(f"bench_lora.py: error: {shlex.join(cmd)}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(lines[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lora_rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="steps a run (the first fifth not timed)")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    print(f"cpu ({os.cpu_count()} CPUs), torch {torch.__version__}, float32, GPT-2 124M's shape from scratch, B=2, "
          f"T=128, {args.steps} steps a run, {args.runs} runs each, alternating")
    paths = {"full": [], f"LoRA r={args.lora_rank}": ["--lora_rank", str(args.lora_rank)]}
    runs = {k: [] for k in paths}
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as log_dir:
        for i in range(args.runs):
            for k in list(paths) if i % 2 == 0 else list(paths)[::-1]:
                runs[k].append(benchmark(paths[k], args.steps, log_dir))
    ms = {k: statistics.median(run["ms_per_step"] for run in runs[k]) for k in paths}
    state = {k: statistics.median(run["state_gib_per_rank"] for run in runs[k]) for k in paths}
    for k in paths:
        each = ", ".join(f"{run['ms_per_step']:,.0f}" for run in runs[k])
        print(f"{k:>9}: median {ms[k]:,.0f} ms/step (runs: {each})   state {state[k]:.3f} GiB")
    full, lora = paths
    print(f"LoRA/full: {ms[lora] / ms[full]:.2f}x the time of a step, {state[lora] / state[full]:.2f}x the state")


if __name__ == "__main__":
    main()
