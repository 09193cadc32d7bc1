"""
Why FSDP here keeps bf16 autocast instead of FSDP2's MixedPrecisionPolicy: the two side by side, measured.

    torchrun --standalone --nproc_per_node=2 tools/fsdp_precision.py            # on CPUs (gloo) or GPUs (nccl)
    torchrun --standalone --nproc_per_node=2 tools/fsdp_precision.py --steps 50 --n_embd 256

Trains the same GPT, from the same weights on the same batches of input.txt, four ways: float32 (the reference), DDP
with bf16 autocast (the lecture's), FSDP with bf16 autocast (train_gpt2.py --fsdp 1), and FSDP with
MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) and no autocast (torchtitan's way). It prints, per way, the
largest difference of its per-step losses from float32's and from DDP's, the bytes each all-gather moves, and the
median step time on this machine.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from gpt2_tokenizer import get_encoding  # noqa: E402
from train_gpt2 import GPT, GPTConfig  # noqa: E402


def run(way, config, batches, device):
    torch.manual_seed(1337)
    model = GPT(config).to(device)
    autocast = way != "fsdp_mp"
    if way == "ddp_bf16":
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device.startswith("cuda") else None)
    elif way.startswith("fsdp"):
        mesh = DeviceMesh.from_group(dist.new_group(), device.split(":")[0])  # (a group of its own, as train_gpt2's)
        policy = MixedPrecisionPolicy()  # (parameters and gradients as they are: float32)
        if way == "fsdp_mp":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    raw = model.module if isinstance(model, DDP) else model
    optimizer = raw.configure_optimizers(0.1, 1e-3, device.split(":")[0], master_process=False)
    losses, times = [], []
    for x, y in batches:
        t0 = time.perf_counter()
        optimizer.zero_grad()
        with torch.autocast(device.split(":")[0], torch.bfloat16, enabled=autocast and way != "fp32"):
            loss = model(x.to(device), y.to(device))[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        summed = loss.detach().float().clone()
        dist.all_reduce(summed)  # (gloo has no AVG: sum, then divide)
        losses.append(summed.item() / dist.get_world_size())
        times.append(time.perf_counter() - t0)
    return np.array(losses), float(np.median(times[2:]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=64)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    config = GPTConfig(block_size=args.T, vocab_size=50304, n_layer=args.n_layer, n_head=4, n_embd=args.n_embd)
    with open(os.path.join(ROOT, "input.txt"), encoding="utf-8") as f:
        tokens = torch.tensor(get_encoding().encode_ordinary(f.read()), dtype=torch.long)
    n = args.B * args.T
    batches = [(tokens[s:s + n].view(args.B, args.T), tokens[s + 1:s + n + 1].view(args.B, args.T))
               for s in range(rank * n, args.steps * n * world, n * world)]
    results = {way: run(way, config, batches, device) for way in ("fp32", "ddp_bf16", "fsdp_bf16", "fsdp_mp")}
    if rank == 0:
        params_per_block = sum(p.numel() for p in GPT(config).transformer.h[0].parameters())
        print(f"{world} ranks on {device.split(':')[0]}, torch {torch.__version__}; {args.steps} steps of "
              f"{args.B} x {args.T} tokens a rank, {args.n_layer} layers of width {args.n_embd}")
        for way, (losses, seconds) in results.items():
            gathered = "-" if not way.startswith("fsdp") else (2 if way == "fsdp_mp" else 4) * params_per_block
            print(f"  {way:10s} loss - fp32's: max {np.abs(losses - results['fp32'][0]).max():.2e}  "
                  f"- DDP bf16's: max {np.abs(losses - results['ddp_bf16'][0]).max():.2e}  "
                  f"all-gather a block: {gathered} bytes  step: {1000 * seconds:.1f} ms (median)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
