"""
The one command to run on a first GPU machine: how fast GPT-2 124M trains here, how large a batch fits, and what
activation checkpointing and FSDP cost and save.

    python tools/gpu_check.py          # 124M at B = 8, 16, 32, 64, compile on and off, and with activation
                                       # checkpointing; LoRA (rank 8) on 124M and gpt2-medium, next to a full step;
                                       # on 2+ GPUs gpt2-medium under DDP and FSDP; HellaSwag's full val
    python tools/gpu_check.py --cpu    # the same steps, reduced (a tiny model, one B, 2 processes) on the CPU

Each row is `python train_gpt2.py --preset gpt2 --B <B> --compile <0|1> --benchmark <steps>` on one GPU (or under
`torchrun --nproc_per_node=<GPUs>` for the DDP and FSDP rows), over random token shards this script writes (speed does
not depend on the text): its JSON line gives tok/s, ms/step, MFU, peak memory and the state (parameters, gradients,
AdamW) a rank holds; a run out of memory is marked OOM. Then the HellaSwag val split (downloaded the first time) is
scored once to compile and once timed, by a 124M model as in training. The table is printed and written as JSON
(gpu_check-<date>.json, or --out). The README's GPU figures come from this output only.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import hellaswag  # noqa: E402
from gpt2_tokenizer import atomic_write  # noqa: E402
from train_gpt2 import GPT, GPTConfig, pick_dtype  # noqa: E402

TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64", "--T", "64",
        "--total_batch_size", "1024", "--device", "cpu"]


def write_shards(root, tokens=4_000_000):
    rng = np.random.default_rng(0)
    for name in ("edufineweb_val_000000.npy", "edufineweb_train_000001.npy"):
        np.save(os.path.join(root, name), rng.integers(0, 50257, tokens, dtype=np.uint16))


def train_row(data, B, compile, steps, extra, processes=1):
    """One benchmark run: its JSON line, or the error (OOM) with what was asked."""
    launcher = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                         f"--nproc_per_node={processes}"]
    cmd = [*launcher, os.path.join(ROOT, "train_gpt2.py"), "--preset", "gpt2", "--data", data, "--B", str(B),
           "--compile", str(compile), "--benchmark", str(steps), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=data)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode == 0 and lines:
        return json.loads(lines[-1])
    asked = {"B": B, "compile": bool(compile), "world_size": processes, "fsdp": "--fsdp" in extra,
             "activation_checkpointing": "--activation_checkpointing" in extra,
             "lora": {"rank": int(extra[extra.index("--lora_rank") + 1])} if "--lora_rank" in extra else None}
    if "out of device memory" in r.stderr or "out of memory" in r.stderr:
        return dict(asked, error="OOM")
    return dict(asked, error=(r.stderr.strip().splitlines() or ["?"])[-1][:300])


def label(row):
    how = "FSDP" if row["fsdp"] else "DDP" if row["world_size"] > 1 else "one"
    return (f"{how:4s} x{row['world_size']} B {row['B']:3d} compile {int(row['compile'])}"
            + (" AC" if row["activation_checkpointing"] else "   ")
            + (f" LoRA r={row['lora']['rank']}" if row.get("lora") else ""))


def show(row):
    if "error" in row:
        print(f"  {label(row)}: {row['error']}")
        return
    mfu, memory = (row[k] if row[k] is not None else "n/a" for k in ("mfu", "peak_memory_gib"))
    print(f"  {label(row)}: {row['tok_per_sec']:>12,.0f} tok/s {row['ms_per_step']:>10,.1f} ms/step  MFU {mfu}  "
          f"peak memory {memory} GiB  state {row['state_gib_per_rank']} GiB a rank")


def hellaswag_time(device, cpu, limit):
    """Seconds to score the val split with a 124M model (tiny on --cpu), compiled as training does (not on --cpu)."""
    try:
        examples = list(hellaswag.iterate_examples("val"))[:limit]
    except hellaswag.HellaSwagUnavailable as e:
        return {"error": str(e)[:300]}
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64) if cpu else GPTConfig(vocab_size=50304)
    model = GPT(config).to(device).eval()
    dtype = pick_dtype("auto", torch.device(device).type)[0]
    times = []
    for _ in range(2):  # the first compiles
        t0 = time.perf_counter()
        n_norm, _, total = hellaswag.evaluate(model, examples, device, block_size=config.block_size, dtype=dtype,
                                              compile=not cpu)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"examples": total, "seconds_first": round(times[0], 2), "seconds": round(times[1], 2)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="a reduced check on the CPU (a tiny model, one B)")
    p.add_argument("--steps", type=int, help="steps per benchmark run (default 12; 4 with --cpu)")
    p.add_argument("--out", help="the JSON file (default gpu_check-<date>.json here)")
    args = p.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("gpu_check.py: error: no CUDA device here; run with --cpu for the reduced check")
    device = "cpu" if args.cpu else "cuda:0"
    ladder, compiles = ([4], [0]) if args.cpu else ([8, 16, 32, 64], [1, 0])
    gpus = 2 if args.cpu else torch.cuda.device_count()
    steps = args.steps or (2 if args.cpu else 12)
    now = datetime.datetime.now()
    out = args.out or f"gpu_check-{now.strftime('%Y%m%d-%H%M%S')}.json"
    name = torch.cuda.get_device_name(device) if not args.cpu else "cpu"
    print(f"gpu_check: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, {now:%Y-%m-%d %H:%M}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as data:
        write_shards(data, 100_000 if args.cpu else 4_000_000)
        small = TINY if args.cpu else []
        for compile in compiles:
            for B in ladder:
                rows.append(train_row(data, B, compile, steps, small))
                show(rows[-1])
        fits = {c: max([r["B"] for r in rows if r["compile"] == bool(c) and "error" not in r], default=None)
                for c in compiles}
        # activation checkpointing: what it saves in memory and costs in speed, at every B and past the largest (--cpu:
        # in the FSDP row below only)
        for B in [] if args.cpu else ladder + [128]:
            rows.append(train_row(data, B, compiles[0], steps, [*small, "--activation_checkpointing", "1"]))
            show(rows[-1])
        # LoRA on one GPU: the frozen model's speed, peak memory and state, for 124M beside its full-training row of
        # the same B, and for gpt2-medium (one micro step a step), full then LoRA (--cpu: none)
        if not args.cpu:
            print("LoRA (--lora_rank 8) on one GPU: 124M (its full row above), then gpt2-medium full and LoRA")
            lora = ["--lora_rank", "8"]
            medium = ["--preset", "gpt2-medium", "--total_batch_size", str(16 * 1024)]
            for extra in [lora, medium, [*medium, *lora]]:
                rows.append(train_row(data, 16, compiles[0], steps, extra))
                show(rows[-1])
        # DDP and FSDP on all the GPUs: the state a rank holds, and the speed, for gpt2-medium (--cpu: TINY's model,
        # FSDP with activation checkpointing only, to check the plumbing)
        if gpus >= 2:
            medium = small if args.cpu else ["--preset", "gpt2-medium", "--total_batch_size", str(16 * 1024 * gpus)]
            layouts = [[], ["--fsdp", "1"], ["--fsdp", "1", "--activation_checkpointing", "1"]]
            for extra in layouts[2:] if args.cpu else layouts:
                rows.append(train_row(data, ladder[0] if args.cpu else 16, compiles[0], steps, [*medium, *extra], gpus))
                show(rows[-1])
    print("largest B that fits: " + ", ".join(f"compile {c}: {fits[c]}" for c in compiles))
    hella = hellaswag_time(device, args.cpu, 200 if args.cpu else None)
    print(f"HellaSwag val: {hella.get('examples')} examples in {hella['seconds']} s (first, compiling: "
          f"{hella['seconds_first']} s)" if "error" not in hella else f"HellaSwag val: {hella['error']}")
    result = {"date": now.isoformat(timespec="seconds"), "device": name, "torch": torch.__version__,
              "cuda": torch.version.cuda, "cpu_mode": args.cpu, "rows": rows,
              "largest_B": {f"compile {c}": fits[c] for c in compiles}, "hellaswag_val": hella}
    with atomic_write(out) as tmp, open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
