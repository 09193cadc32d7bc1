"""
GPT-2 (124M) as "Let's reproduce GPT-2 (124M)" builds it, in its order, with short sections of our own.

    python train_gpt2.py                                     # a preset that fits this machine
    torchrun --standalone --nproc_per_node=8 train_gpt2.py   # the lecture's run, after python fineweb.py
    torchrun --standalone --nproc_per_node=8 train_gpt2.py --preset gpt2-xl --fsdp 1   # GPT-2 XL, sharded
"""

import argparse
import contextlib
import datetime
import glob
import io
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn  # (first: imported later, it holds the group)
import torch.nn as nn
from torch.distributed.checkpoint import state_dict as dcp
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

import hellaswag
from gpt2_tokenizer import EOT, UsageError, atomic_write, chat_prompt, get_encoding, pack_chats, read_chats, reason, \
    save_hf_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# the model
class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v of all heads in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.NANOGPT_SCALE_INIT = 1
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def forward(self, x, cache=None):
        B, T, C = x.size()  # batch, sequence length, channels (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:  # GPT.generate's KV cache: the earlier positions' keys and values, then these
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        S = k.size(2)  # new queries see the cached positions and the new ones up to their own (one sees all: no mask)
        mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T) if 1 < T < S else None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)  # flash attention
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # the heads side by side
        return self.c_proj(y)

class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.NANOGPT_SCALE_INIT = 1

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))

class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):  # (pre-LayerNorm)
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x

class LoRALinear(nn.Linear):
    """LoRA (--lora_rank), for a GPT-2 whose AdamW state does not fit: the Linear frozen, beside it a low-rank update
    that trains, x W^T + b + (alpha/r) x A^T B^T (no W + BA, no gradient of W's size); B = 0: it starts as the base."""

    def __init__(self, linear, rank, alpha):
        super().__init__(linear.in_features, linear.out_features, device="meta")  # (then the Linear's own tensors)
        self.weight, self.bias = linear.weight, linear.bias
        self.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, device=linear.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # (as nn.Linear initializes its weight)
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, device=linear.weight.device))
        self.scale = alpha / rank

    def forward(self, x):
        return super().forward(x) + (x @ self.lora_A.t() * self.scale) @ self.lora_B.t()

class KVCache:
    """GPT.generate's keys and values: [k, v] of the positions seen so far, per block. An object of its own, not a
    list: on a GPU, FSDP's root moves a forward's list arguments as copies, and the blocks would fill those."""

    def __init__(self, n_layer):
        self.blocks = [[] for _ in range(n_layer)]

    def __len__(self):  # the positions held
        return self.blocks[0][0].size(2) if self.blocks[0] else 0

    def crop(self, n):  # keep the first n positions
        for kv in self.blocks:
            kv[:] = [t[:, :, :n] for t in kv] if n else []

@dataclass
class GPTConfig:
    block_size: int = 1024  # the longest sequence
    vocab_size: int = 50257  # 50,000 BPE merges, 256 byte tokens and <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768

    def check(self, source):
        """A config this project cannot build, or whose vocabulary is not GPT-2's: one line naming `source`."""
        if min(asdict(self).values()) <= 0 or self.n_embd % self.n_head:
            raise UsageError(f"{source}: {self} cannot be built: sizes > 0, n_embd a multiple of n_head")
        if self.vocab_size < 50257:  # e.g. nanoGPT's shakespeare_char, 65 characters
            raise UsageError(f"{source}: {self.vocab_size} tokens, not GPT-2's 50257: this project uses GPT-2's BPE")

class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(  # (the lecture's order: its initial weights)
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        self.activation_checkpointing = False  # True: blocks recompute their activations in backward (train sets it)
        self.lora = None  # {"rank", "alpha"} once add_lora has run

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if hasattr(module, "NANOGPT_SCALE_INIT"):
                std *= (2 * self.config.n_layer) ** -0.5  # 2 residual additions per block
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache=None):
        B, T = idx.size()  # (cache: GPT.generate's KVCache)
        start = len(cache) if cache is not None else 0  # positions in the cache
        assert start + T <= self.config.block_size, f"sequence of {start + T} > block size {self.config.block_size}"
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, n_embd)
        for i, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)  # keeps x only; the rest is recomputed in backward
            else:
                x = block(x, cache.blocks[i] if cache is not None else None)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:  # (reshape: non-contiguous targets too)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # (transposed)

    @classmethod
    def from_pretrained(cls, model_type, ckpt=None):
        """transformers' GPT-2 (a name or directory), or a checkpoint file; ckpt: what load_weights read of it."""
        ckpt = ckpt or load_weights(model_type)
        model = cls(GPTConfig(**ckpt["config"]))
        if ckpt.get("lora"):  # a LoRA run to resume: its adapters as they were (read as weights, they are merged)
            model.add_lora(**ckpt["lora"])
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise UsageError(f"{model_type}: its weights do not fit its config ({str(e).splitlines()[1][1:200]})")
        return model

    def add_lora(self, rank, alpha):  # LoRA: an adapter beside each Block's four Linears, all else frozen
        self.requires_grad_(False)
        for block in self.transformer.h:
            for module, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"),
                                 (block.mlp, "c_proj")):
                setattr(module, name, LoRALinear(getattr(module, name), rank, alpha))
        self.lora = dict(rank=rank, alpha=alpha)

    def to_hf(self):  # transformers' GPT-2 of our weights (50257 tokens)
        from transformers import GPT2Config, GPT2LMHeadModel
        c = self.config
        model_hf = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=c.block_size, n_embd=c.n_embd,
                                              n_layer=c.n_layer, n_head=c.n_head, bos_token_id=EOT, eos_token_id=EOT))
        sd_hf = model_hf.state_dict()
        with torch.no_grad():
            for k, v in self.state_dict().items():
                sd_hf[k].copy_((v.t() if k.endswith(self.CONV1D) else v)[:50257])
        model_hf.generation_config.pad_token_id = EOT
        return model_hf

    def configure_optimizers(self, weight_decay, learning_rate, device_type, master_process=True):
        params = [p for p in self.parameters() if p.requires_grad]  # (LoRA: the adapters only)
        decay_params = [p for p in params if p.dim() >= 2]  # matmuls and embeddings decay
        nodecay_params = [p for p in params if p.dim() < 2]  # biases and LayerNorms do not
        optim_groups = [{"params": decay_params, "weight_decay": weight_decay},
                        {"params": nodecay_params, "weight_decay": 0.0}]
        use_fused = device_type == "cuda"  # (one kernel for the whole update)
        if master_process:
            print(f"num decayed parameter tensors: {len(decay_params)}; non-decayed: {len(nodecay_params)}")
            print(f"using fused AdamW: {use_fused}")
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=use_fused)

    def flops_per_token(self, T):  # training FLOPs, nanoGPT's estimate (a frozen weight, LoRA's: no gradient, 4 not 6)
        c = self.config
        wpe = self.transformer.wpe.weight  # (a lookup: no FLOPs)
        n = sum((6 if p.requires_grad else 4) * p.numel() for p in self.parameters() if p is not wpe)
        return n + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * T

    @torch.no_grad()
    def generate(self, idx, max_length, top_k=50, temperature=1.0, generator=None, on_token=None, cache=None):
        """Top-k samples to max_length or until on_token(token) is True. KV cache (given: it holds a prefix of idx);
        past block_size the window slides."""
        cache = cache if cache is not None else KVCache(self.config.n_layer)
        while idx.size(1) < max_length:
            if idx.size(1) <= self.config.block_size:  # the positions not in the cache yet
                logits, _ = self(idx[:, len(cache):], cache=cache)
            else:  # the window slides
                logits, _ = self(idx[:, -self.config.block_size:])
            probs = F.softmax(logits[:, -1, :50257].float() / temperature, dim=-1)  # (B, vocab)
            topk_probs, topk_indices = torch.topk(probs, min(top_k, probs.size(-1)), dim=-1)  # (B, k)
            ix = torch.multinomial(topk_probs, 1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, torch.gather(topk_indices, -1, ix)), dim=1)
            if on_token and on_token(idx[0, -1].item()):
                break
        return idx

    def generate_text(self, prompt, num_samples=4, max_length=32, seed=42, top_k=50, temperature=1.0,
                      dtype=torch.float32, stream=False):  # stream: print the first sample as it comes
        enc = get_encoding()
        device = self.lm_head.weight.device
        tokens = prompt if isinstance(prompt, list) else enc.encode(prompt, allowed_special="all") or [EOT]  # ("": EOT)
        idx = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(0).repeat(num_samples, 1)

        def show(token):  # (bytes: the terminal joins split characters)
            sys.stdout.buffer.write(enc.decode_single_token_bytes(token))
            sys.stdout.flush()
        if stream:
            print(enc.decode(tokens), end="", flush=True)
        self.eval()  # (the loop sets train mode again)
        with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
            idx = self.generate(idx, max_length, top_k, temperature, torch.Generator(device).manual_seed(seed),
                                show if stream else None)
        return [enc.decode(row.tolist()) for row in idx]

# -----------------------------------------------------------------------------
# the data: uint16 token shards (fineweb.py's, nanoGPT's, llm.c's), a .txt file (90% train, 10% val), or a .jsonl
# file of conversations (only the replies' tokens are targets)
_TOKENS = {}  # each file's tokens, opened once
_IDS_CHECKED = set()  # the files whose ids were checked (when first read)

def shard_files(root, split):  # fineweb.py's .npy, nanoGPT's and llm.c's .bin
    return sorted(f for ext in ("npy", "bin") for f in glob.glob(os.path.join(root, f"*{split}*.{ext}")))

def load_tokens(filename, split):
    """A shard as a memory map, format and size checked (ids: when first read); a .txt's tokens, 90% train, 10% val."""
    if filename not in _TOKENS and filename.endswith(".txt"):
        try:
            with open(filename, encoding="utf-8") as f:
                _TOKENS[filename] = np.array(get_encoding().encode_ordinary(f.read()), dtype=np.uint16)
        except UnicodeDecodeError as e:
            raise UsageError(f"--data {filename} is not UTF-8 ({e.reason} at byte {e.start}); convert it")
    if filename not in _TOKENS:
        try:
            if filename.endswith(".npy"):
                tokens = np.load(filename, mmap_mode="r", allow_pickle=False)
            else:  # nanoGPT's {train,val}.bin: raw uint16; llm.c's: 256 int32 (magic, version, count), then uint16
                offset = 0 if os.path.basename(filename) in ("train.bin", "val.bin") else 1024
                header = np.fromfile(filename, np.int32, 3).tolist()
                size = os.path.getsize(filename)
                if offset and header != [20240520, 1, (size - 1024) / 2]:
                    raise UsageError(f"shard {filename} is not llm.c's GPT-2 format (magic 20240520, version 1, "
                                     f"tokens): its header says {header}, for {size} bytes")
                tokens = np.memmap(filename, np.uint16, "r", offset)
        except (ValueError, OSError, EOFError) as e:
            raise UsageError(f"shard {filename} is cut short or not in its format ({e}); make it again")
        if not isinstance(tokens, np.ndarray):  # np.load opens a zip (an .npz) as an archive of arrays
            raise UsageError(f"shard {filename} is a zip (an .npz?), not one array saved by np.save; make it again")
        if tokens.ndim != 1 or tokens.dtype.kind not in "ui" or tokens.size == 0:
            raise UsageError(f"shard {filename} is not 1-D token ids ({tokens.dtype}, shape {tokens.shape})")
        _TOKENS[filename] = tokens
    if filename.endswith(".txt"):
        n = int(0.9 * len(_TOKENS[filename]))
        return _TOKENS[filename][:n] if split == "train" else _TOKENS[filename][n:]
    return _TOKENS[filename]

def find_data(data):
    """(path, note): without --data, edu_fineweb10B/ or else input.txt."""
    if data is None:
        default = os.path.join(HERE, "edu_fineweb10B")
        if shard_files(default, "train"):
            return default, None
        return os.path.join(HERE, "input.txt"), f"no shards in {default} (python fineweb.py makes them)"
    if not os.path.exists(data) or os.path.isfile(data) and not data.endswith((".txt", ".jsonl")):
        raise UsageError(f"--data {data}: give a directory of shards (not one shard), a .txt or a .jsonl of chats")
    if os.path.isdir(data) and not shard_files(data, ""):
        raise UsageError(f"--data {data} holds no .npy (nor nanoGPT's or llm.c's .bin) shards: make them with "
                         f"fineweb.py --output_dir {data} --input FILES (or give a .txt file)")
    return data, None

class DataLoaderLite:
    """Rank r of W reads B*T+1 tokens at B*T*r, then moves on by B*T*W. shuffle: each epoch, shards and documents
    in a seeded random order (a shard's rest carried into the next): none lost or repeated. Conversations: rows of
    T tokens packed with whole ones (in a new seeded order each epoch with shuffle), the replies the only targets."""

    def __init__(self, B, T, process_rank=0, num_processes=1, split="train", data_root=None, vocab_size=50304,
                 shuffle=False, seed=1337, device="cpu"):
        self.B, self.T = B, T
        self.process_rank = process_rank
        self.num_processes = num_processes
        self.split = split
        self.vocab_size = vocab_size
        self.shuffle = shuffle
        self.seed = seed
        self.device = device
        data_root = find_data(data_root)[0]
        shards = [data_root] if os.path.isfile(data_root) else shard_files(data_root, split)
        if not shards:
            raise UsageError(f"no {split} shards (*{split}*.npy or .bin) in {data_root}")
        self.chats, note = read_chats(data_root, split, T) if data_root.endswith(".jsonl") else (None, None)
        if note and process_rank == 0:  # (conversations: how many)
            print(note, flush=True)
        need = B * T * num_processes + 1  # one step's read: a shard too small for it (a last shard's rest) is skipped
        sizes = {path: len(self.read(path, 0)[0]) for path in shards}  # every shard's format and size, before step 0
        self.shards = [path for path in shards if sizes[path] >= need]
        for path in [path for path in shards if sizes[path] < need and process_rank == 0]:
            print(f"skipped {path}: too small for one step", flush=True)
        self.sizes = [sizes[path] for path in self.shards]
        if not self.shards:
            raise UsageError(f"{split} data too small for one step ({need} tokens, B*T*world_size+1): lower --B or --T")
        self.reset()

    def reset(self):
        self.epoch = 0
        self.current_shard = 0
        self.position = 0
        self.open(np.zeros(0, dtype=np.uint16))

    def read(self, path, epoch):  # a shard's tokens and which are targets (None: all); conversations: epoch's rows
        if self.chats is None:
            return load_tokens(path, self.split), None
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.chats)) if self.shuffle else None
        return pack_chats(self.chats, self.T, order)

    def open(self, carry):
        shard = self.current_shard
        if self.shuffle:
            shard = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))[shard]
        path = self.shards[shard]
        tokens, mask = self.read(path, self.epoch)
        if path not in _IDS_CHECKED:  # every id in 0..vocab_size-1 (a 1e8-token shard: a fraction of a second)
            low = int(tokens.min()) if tokens.dtype.kind == "i" else 0
            high = int(tokens.max())
            if low < 0 or high >= self.vocab_size:
                raise UsageError(f"shard {path} is not 1-D token ids below vocab_size {self.vocab_size} (it holds "
                                 f"{low if low < 0 else high}); make it again")
            _IDS_CHECKED.add(path)
        if self.shuffle and self.chats is None:  # (conversations: shuffled before they are packed)
            starts = np.flatnonzero(tokens == EOT)
            starts = np.concatenate([[0], starts[starts > 0], [len(tokens)]])
            order = np.random.default_rng([self.seed, self.epoch, shard]).permutation(len(starts) - 1)
            tokens = np.concatenate([carry] + [tokens[starts[i]:starts[i + 1]] for i in order])
        self.carry = carry
        self.tokens = tokens
        self.mask = mask if mask is not None else np.broadcast_to(True, tokens.shape)  # (text: every token)

    def next_batch(self):
        B, T = self.B, self.T
        start = self.position + B * T * self.process_rank
        buf = torch.from_numpy(self.tokens[start:start + B * T + 1].astype(np.int64))
        if self.device.startswith("cuda"):
            buf = buf.pin_memory()  # (then the copy is asynchronous)
        buf = buf.to(self.device, non_blocking=True)  # one copy: x and y are views
        x = buf[:-1].view(B, T)  # inputs
        y = buf[1:].view(B, T)  # targets
        if self.chats is not None:  # conversations: the replies' tokens are the only targets, the rest -1 (ignored)
            counted = torch.from_numpy(self.mask[start + 1:start + B * T + 1]).view(B, T)
            y = y.masked_fill(~counted.to(self.device), -1)
        self.position += B * T * self.num_processes
        if self.position + B * T * self.num_processes + 1 > len(self.tokens):  # the next read does not fit
            carry = self.tokens[self.position:] if self.shuffle else self.carry
            self.current_shard = (self.current_shard + 1) % len(self.shards)
            self.position = 0
            if self.current_shard == 0:
                self.epoch += 1
            self.open(carry)
        return x, y

    def next_step(self, micro_steps):
        """A step's micro batches, read first: [(x, y, weight)], weight their share of all ranks' counted targets times
        micro_steps * num_processes, so the step's loss is their mean (text: 1.0; conversations: by reply tokens)."""
        n = self.B * self.T
        batches = []  # (x, y, the targets counted in this rank's batch, in all ranks'): counted before it moves on
        for _ in range(micro_steps):
            everyones = self.mask[self.position + 1:self.position + n * self.num_processes + 1]
            mine = everyones[n * self.process_rank:n * self.process_rank + n]
            batches.append((*self.next_batch(), mine.sum(), everyones.sum()))
        total = sum(b[3] for b in batches)
        return [(x, y, int(mine) * micro_steps * self.num_processes / int(total)) for x, y, mine, _ in batches]

    def state_dict(self):
        return {"epoch": self.epoch, "shard": self.current_shard, "position": self.position, "shuffle": self.shuffle,
                "carry": torch.from_numpy(self.carry.astype(np.int32)), "shards": len(self.shards)}

    def load_state_dict(self, state):
        if (state["shards"], state["shuffle"]) != (len(self.shards), self.shuffle):
            raise UsageError("the checkpoint read other shards: give the same --data and --shuffle")
        self.epoch = state["epoch"]
        self.current_shard = state["shard"]
        self.position = state["position"]
        self.open(state["carry"].numpy().astype(np.uint16))

# -----------------------------------------------------------------------------
# the learning rate schedule, MFU, checkpoints
def get_lr(it, max_lr=6e-4, min_lr=6e-5, warmup_steps=715, max_steps=19073):
    if it < warmup_steps:  # linear warmup
        return max_lr * (it + 1) / warmup_steps
    if it > max_steps:
        return min_lr
    decay_ratio = (it - warmup_steps) / max(1, max_steps - warmup_steps)  # then cosine to min_lr
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)

# MFU's denominator: dense 16-bit tensor-core FLOP/s (data sheets' "with sparsity" halved), by exact device name
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,  # the H100 data sheet
    "NVIDIA H200": 989e12, "NVIDIA GH200 480GB": 989e12, "NVIDIA GH200 144G HBM3e": 989e12,  # H200, GH200 sheets
    "NVIDIA B200": 2250e12,  # the HGX B200 data sheet
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12,  # the A100 data sheet
    "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A10": 125e12,  # the A10 data sheet (AWS's A10G has none: no MFU)
    "NVIDIA RTX A6000": 155e12,  # the RTX A6000 data sheet
    "NVIDIA L4": 121e12, "NVIDIA L40S": 362e12,  # the L4, L40S data sheets
    "NVIDIA RTX 6000 Ada Generation": 364e12,  # the RTX 6000 Ada data sheet
    "NVIDIA GeForce RTX 3090": 71e12, "NVIDIA GeForce RTX 4090": 165e12,  # Ampere, Ada whitepapers: fp32 accumulate
    "Tesla T4": 65e12, "Tesla V100-SXM2-16GB": 125e12, "Tesla V100-SXM2-32GB": 125e12,  # the T4, V100 data sheets
    "AMD Instinct MI300X": 1307e12,  # the MI300X data sheet
    "AMD Instinct MI250X": 191.5e12,  # the MI250X data sheet: 383e12 for its 2 dies (torch: 2 devices). ROCm names
    # device 0x740C "AMD Instinct MI250X / MI250", either card (an MI250: 362e12): no MFU for it, never a guess
}

def load_checkpoint(path, resume=False):
    """Ours, the lecture's or nanoGPT's, as ours: weights_only (their GPTConfig by name), memory-mapped, on the CPU."""
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals([(GPTConfig, "__main__.GPTConfig")]):
            warnings.simplefilter("ignore")  # (torch's, before it refuses a plain pickle)
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        raise UsageError(f"cannot load checkpoint {path}: {reason(e)}")
    try:
        config = ckpt.get("model_args") or ckpt["config"]  # nanoGPT's, ours, or the lecture's GPTConfig
        config = asdict(config) if isinstance(config, GPTConfig) else config
        config = {k: int(config[k]) for k in MODEL_KEYS}
        sd = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items() if not k.endswith(".attn.bias")}
    except Exception:  # (any other layout)
        raise UsageError(f"{path} is not a checkpoint of train_gpt2.py, the lecture's or nanoGPT's")
    GPTConfig(**config).check(path)
    if resume and "train_loader" not in ckpt:
        raise UsageError(f"{path} holds weights, not a run to resume: start from it with --init_from {path}")
    if "model_args" in ckpt:  # nanoGPT's bias=False: zero biases
        for k in [k for k in sd if k.endswith(".weight") and not k.startswith(("transformer.w", "lm_head"))]:
            sd.setdefault(k[:-6] + "bias", torch.zeros(len(sd[k]), dtype=sd[k].dtype))
        if int(os.environ.get("RANK", 0)) == 0:
            zeros = "" if ckpt["model_args"].get("bias", True) else "bias=False: zero biases, the same function; "
            print(f"{path} is nanoGPT's: {zeros}its exact GELU runs as the tanh one: outputs differ slightly")
    if ckpt.get("lora") and not resume:  # a LoRA run's, read as weights: the adapters merged, W + (alpha/r) B A
        scale = ckpt["lora"]["alpha"] / ckpt["lora"]["rank"]
        for k in [k.removesuffix("lora_A") for k in sd if k.endswith(".lora_A")]:
            sd[k + "weight"] = sd[k + "weight"].float() + scale * sd.pop(k + "lora_B") @ sd.pop(k + "lora_A")
        ckpt["lora"] = None
    ckpt.update(config=config, model=sd)
    return ckpt

def load_weights(source):
    """A checkpoint file, or transformers' GPT-2 (a name or directory) as a checkpoint of ours: {"config", "model"}."""
    if os.path.isfile(source) or source.endswith(".pt"):
        return load_checkpoint(source)
    try:
        model_hf = hellaswag.load_model(source)  # (as hellaswag.py -m loads it)
    except hellaswag.HellaSwagUnavailable as e:
        raise UsageError(str(e)) from None
    c = model_hf.config
    config = GPTConfig(c.n_positions, c.vocab_size, c.n_layer, c.n_head, c.n_embd)
    config.check(source)
    sd = {k: v.t() if k.endswith(GPT.CONV1D) else v for k, v in model_hf.state_dict().items()}
    return {"config": asdict(config), "model": sd}

def latest_checkpoint(log_dir):
    steps = {int(p[-8:-3]): p for p in glob.glob(os.path.join(log_dir, "model_*.pt")) if p[-8:-3].isdigit()}
    return steps[max(steps)] if steps else None

# -----------------------------------------------------------------------------
# configuration: flags (the lecture's recipe by default), presets, checks before any work
@dataclass
class Recipe:  # the lecture's run; a flag per field (--B 32); presets change some
    data: str = None  # shards' directory or .txt (default edu_fineweb10B/, else input.txt)
    B: int = 64  # micro batch size, per process
    T: int = 1024
    total_batch_size: int = 524288  # tokens per step, by gradient accumulation
    max_lr: float = 6e-4
    min_lr: float = None  # (max_lr/10)
    warmup_steps: int = 715  # (or 715/19073 of a --max_steps given)
    max_steps: int = 19073  # one epoch of 10B tokens
    weight_decay: float = 0.1
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    eval_interval: int = 250  # val loss, HellaSwag, samples
    val_steps: int = 20
    checkpoint_interval: int = 5000
    hellaswag: int = 1
    shuffle: int = 0  # 1: shards and documents in a seeded random order each epoch
    seed: int = 1337

PRESETS = {
    "gpt2": {},  # the lecture's recipe
    "shakespeare": dict(  # nanoGPT's CPU Shakespeare size: minutes on a laptop
        B=16, T=64, total_batch_size=1024, n_layer=4, n_head=4, n_embd=128, block_size=64, max_lr=1e-3,
        warmup_steps=100, max_steps=800, eval_interval=200, checkpoint_interval=800, hellaswag=0),
    # llm.c's recipes for the bigger GPT-2s; B: the largest that fits an 80 GB GPU (tools/memory_plan.py), under DDP,
    # and for gpt2-xl (which does not fit DDP at llm.c's B) under FSDP, which its preset turns on
    "gpt2-medium": dict(  # 350M, 60,000 steps of 524,288 tokens: 31B tokens
        n_layer=24, n_head=16, n_embd=1024, B=32, max_lr=3e-4, min_lr=0.0, warmup_steps=700, max_steps=60000),
    "gpt2-large": dict(  # 774M, 286,102 steps of 524,288 tokens: 150B tokens
        n_layer=36, n_head=20, n_embd=1280, B=16, max_lr=2.5e-4, min_lr=0.0, warmup_steps=700, max_steps=286102),
    "gpt2-xl": dict(  # 1558M, 32,000 steps of 1,048,576 tokens: 34B tokens
        n_layer=48, n_head=25, n_embd=1600, B=16, fsdp=1, total_batch_size=1048576, max_lr=6e-4, min_lr=6e-5,
        warmup_steps=700, max_steps=32000),
}
OPTIONS = dict(  # the flags that are not the recipe's, and their defaults
    preset="auto", log_dir="log", compile=None, fsdp=0, activation_checkpointing=0, lora_rank=0, lora_alpha=16.0,
    device="auto", dtype="auto", resume=None, init_from=None, benchmark=None, eval_only=False, sample=None,
    num_samples=4, max_new_tokens=32, temperature=1.0, top_k=50, chat=False, system=None, export_hf=None)
RUN_KEYS = [f.name for f in fields(Recipe)] + ["dtype", "compile", "fsdp", "activation_checkpointing", "lora_rank",
                                               "lora_alpha"]  # (resumed)
MODEL_KEYS = tuple(f.name for f in fields(GPTConfig))

def build_parser():
    """The command line. Defaults are Recipe's and OPTIONS': parse_args gives only the flags given."""
    p = argparse.ArgumentParser(allow_abbrev=False, argument_default=argparse.SUPPRESS)
    p.error = lambda message: sys.exit(f"train_gpt2.py: error: {message}")  # (one line, no usage)
    a = p.add_argument
    for f in fields(Recipe):
        a(f"--{f.name}", type=f.type, help=f"default {f.default}")
    a("--preset", choices=["auto"] + list(PRESETS), help="default auto: gpt2 on a GPU with FineWeb, else shakespeare")
    a("--log_dir", help="default log")
    a("--compile", type=int, help="1/0 (default 1 on CUDA, when training)")
    a("--fsdp", type=int, help="1: under torchrun, shard the model, gradients and AdamW state (FSDP2); default 0: DDP")
    a("--activation_checkpointing", type=int, help="1: each block recomputes its activations in backward")
    a("--lora_rank", type=int, help="R: train low-rank adapters of rank R beside the frozen Linears (LoRA); default 0")
    a("--lora_alpha", type=float, help="the adapters' scale is lora_alpha / lora_rank; default 16")
    a("--device", help="auto (default), cuda, cuda:N, mps or cpu")
    a("--dtype", choices=["auto", "bfloat16", "float16", "float32"])
    a("--resume", help="auto (the newest in --log_dir) or a checkpoint")
    a("--init_from", help="gpt2[-medium|-large|-xl], a save_pretrained directory or a checkpoint")
    a("--benchmark", type=int, metavar="N", help="N steps, then a JSON line of speed")
    a("--eval_only", action="store_true", help="with --init_from: evaluate as training does, no training")
    a("--sample", metavar="PROMPT")
    for name in ("num_samples", "max_new_tokens", "temperature", "top_k"):  # (--sample's and --chat's)
        a(f"--{name}", type=type(OPTIONS[name]), help=f"default {OPTIONS[name]}")
    a("--chat", action="store_true", help="with --init_from: a conversation, a line of stdin a turn")
    a("--system", metavar="TEXT", help="--chat's system message")
    a("--export_hf", metavar="DIR")
    return p

def parse_config(argv, world_size):
    """(settings, why this preset, the weights or run to start from): flags given over a resumed run's, a preset's."""
    given = vars(build_parser().parse_args(argv))  # the flags on the command line, and only those
    flags = argparse.Namespace(**{**asdict(Recipe()), **OPTIONS, **given})
    if "RANK" in os.environ and flags.device.startswith("cuda:"):
        raise UsageError(f"--device {flags.device} under torchrun: each rank takes cuda:LOCAL_RANK; give --device cuda")
    device_type = pick_device(flags.device).split(":")[0]
    resume = latest_checkpoint(flags.log_dir) if flags.resume == "auto" else flags.resume
    if flags.resume and (flags.init_from or (resume and not os.path.isfile(resume))):
        raise UsageError(f"--resume {flags.resume}: no such file (or --init_from too)")
    if flags.resume and not resume:
        print(f"--resume auto: no checkpoint in {flags.log_dir}, starting afresh")
    ckpt = None  # the run to resume, or the weights to start from
    if resume or flags.init_from:
        ckpt = load_checkpoint(resume, resume=True) if resume else load_weights(flags.init_from)
    command = flags.sample is not None or flags.export_hf or flags.chat
    if (command or flags.eval_only) and not ckpt:
        raise UsageError("give --init_from (or --resume): what to load")

    if resume:
        preset, why = ckpt["args"].get("preset", "auto"), "resumed"
    elif flags.preset != "auto" or command:  # (sampling and export: the preset is not used)
        preset, why = "gpt2" if flags.preset == "auto" else flags.preset, "asked for"
    else:  # the recipe on a GPU with FineWeb shards (1e8 tokens and more), else a small GPT
        shards = shard_files(find_data(flags.data)[0], "train")  # (a .txt: none)
        big = sum(map(os.path.getsize, shards)) >= 2e8  # (uint16)
        preset = "gpt2" if device_type == "cuda" and big else "shakespeare"
        why = f"{device_type}, {'over' if big else 'under'} 1e8 tokens of train shards"
    settings = {**asdict(Recipe()), **OPTIONS, **PRESETS.get(preset, {})}
    if resume:
        settings.update({k: v for k, v in ckpt["args"].items() if k in RUN_KEYS})
    elif flags.eval_only:  # the model's own shape: our checkpoint's B, T and val_steps, or its block size as T
        shape = ckpt.get("args") or dict(B=Recipe.B, T=ckpt["config"]["block_size"], val_steps=Recipe.val_steps)
        settings.update(B=shape["B"], T=shape["T"], val_steps=shape["val_steps"])
    settings.update(given)
    settings.update(given=sorted(given), preset=preset, resume=resume)  # (the flags given, by name)
    args = argparse.Namespace(**settings)
    if "max_steps" in given and "warmup_steps" not in given and not resume:  # the warmup keeps its share
        schedule = {**asdict(Recipe()), **PRESETS[preset]} if preset.startswith("gpt2") else asdict(Recipe())
        args.warmup_steps = max(1, round(args.max_steps * schedule["warmup_steps"] / schedule["max_steps"]))
    if args.min_lr is None:
        args.min_lr = args.max_lr * 0.1

    for name, value in vars(args).items():  # every number > 0; a few >= 0; the switches 0 or 1; the seed any
        if type(value) not in (int, float) or name == "seed":  # (text, flags not given, --eval_only)
            continue
        if name in ("hellaswag", "shuffle", "compile", "fsdp", "activation_checkpointing"):
            if value not in (0, 1):
                raise UsageError(f"--{name} {value}: give 0 or 1")
        elif name in ("warmup_steps", "weight_decay", "min_lr", "lora_rank"):
            if value < 0:
                raise UsageError(f"--{name} {value} is out of range: give >= 0")
        elif value <= 0:
            raise UsageError(f"--{name} {value} is out of range: give > 0")
    if args.min_lr > args.max_lr:
        raise UsageError(f"--min_lr {args.min_lr} is out of range: give >= 0 and <= --max_lr")
    GPTConfig(**{k: getattr(args, k) for k in MODEL_KEYS}).check("the model flags")
    if args.fsdp and device_type not in ("cuda", "cpu"):
        raise UsageError(f"--fsdp 1 shards over CUDA GPUs (nccl) or CPUs (gloo), not {device_type}: give --fsdp 0")
    if args.fsdp and args.lora_rank:
        raise UsageError("--lora_rank with --fsdp 1: not sharded here; LoRA's frozen weights take 2 bytes a parameter "
                         "(GPT-2 XL: 3.1 GB), so every GPU holds them under DDP: give --fsdp 0")
    if args.total_batch_size % (args.B * args.T * world_size) and not (args.eval_only or command):
        raise UsageError(f"--total_batch_size: give a multiple of B*T*world_size = {args.B * args.T * world_size}")
    return args, why, ckpt

def pick_device(requested):
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if not hellaswag.device_here(requested):  # (hellaswag.py's -d checks the same)
        raise UsageError(f"--device {requested}: not here ({torch.cuda.device_count()} GPUs); give auto, cuda, cuda:N, "
                         f"mps or cpu")
    return requested

def pick_dtype(requested, device_type):
    if requested != "auto":
        return getattr(torch, requested), "asked for"
    if device_type != "cuda":
        return torch.float32, f"on {device_type}"
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16, "the GPU has bfloat16 tensor cores"
    return torch.float16, "the GPU has no native bfloat16: float16, with a gradient scaler"

def command(args, ckpt):
    source = args.init_from or args.resume
    device = pick_device(args.device)
    model = GPT.from_pretrained(source, ckpt).to(device)
    dtype = pick_dtype(args.dtype, device.split(":")[0])[0]
    if args.chat:
        chat(model, args, dtype)
    elif args.sample is not None:
        max_length = len(get_encoding().encode(args.sample, allowed_special="all") or [EOT]) + args.max_new_tokens
        seed = args.seed if "seed" in args.given else 42
        print(f"sampling from {source}")
        texts = model.generate_text(args.sample, args.num_samples, max_length, seed, args.top_k, args.temperature,
                                    dtype, stream=args.num_samples == 1)
        print("\n".join(f"sample {i}: {text}" for i, text in enumerate(texts)) if args.num_samples > 1 else "")
    else:  # the model and GPT-2's tokenizer
        out = os.path.abspath(args.export_hf)
        if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
            raise UsageError(f"--export_hf {out} exists and is not empty; give a new directory")
        os.makedirs(os.path.dirname(out), exist_ok=True)  # (atomic_write moves the directory in)
        with atomic_write(out) as tmp:
            model.cpu().to_hf().save_pretrained(tmp)
            save_hf_tokenizer(tmp, model.config.block_size)
        print(f"exported {source} to {out}")

def chat(model, args, dtype):
    """--chat: a line of stdin is a user turn, the reply streams as it is generated. The KV cache keeps the history
    (a turn computes its new tokens only); when the block is full the oldest turns go. EOF or Ctrl-C ends it."""
    enc = get_encoding()
    device = model.lm_head.weight.device
    messages = [{"role": "system", "content": args.system}] if args.system else []
    room = args.max_new_tokens if "max_new_tokens" in args.given else model.config.block_size // 4  # (for a reply)
    cache = KVCache(model.config.n_layer)
    cached = []  # the ids the cache holds
    generator = torch.Generator(device).manual_seed(args.seed)
    replies = []  # (seconds to the first token, tokens after it, their seconds) of each reply
    model.eval()
    try:
        while True:
            messages.append({"role": "user", "content": input("> " if sys.stdin.isatty() else "")})
            ids, dropped = chat_prompt(messages, room, model.config.block_size)
            if dropped:
                print(f"(the block of {model.config.block_size} tokens is full: the oldest turns go)", file=sys.stderr)
            same = [a == b for a, b in zip(cached, ids[:-1])] + [False]  # (the cache keeps their common start: the
            cache.crop(same.index(False))  # reply re-encoded from its text may differ; one id at least is fed)
            reply = []  # (token, time)
            t0 = time.time()

            def on_token(token):  # stream the reply (the template's space before it left out); <|endoftext|> ends it
                piece = enc.decode_single_token_bytes(token) if token != EOT else b""
                sys.stdout.buffer.write(piece if reply else piece.removeprefix(b" "))
                sys.stdout.flush()
                reply.append((token, time.time()))
                return token == EOT
            with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
                idx = model.generate(torch.tensor([ids], device=device), len(ids) + room, args.top_k,
                                     args.temperature, generator, on_token, cache)
            replies.append((reply[0][1] - t0, len(reply) - 1, reply[-1][1] - reply[0][1]))
            cached = idx[0, :len(cache)].tolist()
            messages.append({"role": "assistant", "content": enc.decode([t for t, _ in reply if t != EOT])})
            print(flush=True)  # (the reply's end, once it is counted and kept)
    except (EOFError, KeyboardInterrupt):  # (the end of the input, or Ctrl-C)
        print(file=sys.stderr)
    if replies:
        first_token, tokens, seconds = zip(*replies)
        print(f"{len(replies)} replies: {1000 * np.median(first_token):.0f} ms to the first token (median), then "
              f"{sum(tokens) / max(sum(seconds), 1e-9):.1f} tokens/s", file=sys.stderr)

# the others wait in a collective while rank 0 alone writes a checkpoint (GPT-2 XL's: 19 GB) or downloads HellaSwag:
TIMEOUT = datetime.timedelta(hours=1)  # NCCL's default of 10 minutes would end a run on slow storage (gloo's: 30)

def parallelize(model, args, device_type, use_compile, fsdp, ddp, local_rank):
    """(model, raw_model): what the step calls, and the plain module. DDP: each process holds the model and AdamW's
    state, 16 bytes a parameter; FSDP: 1/world_size of that, a block's weights gathered while it computes."""
    model.activation_checkpointing = bool(args.activation_checkpointing)  # (GPT.forward: less memory, more compute)
    if fsdp:
        # FSDP2 as torchtitan applies it: each Block a unit, compiled before it is sharded; the root holds the rest, so
        # wte and the tied lm_head stay one parameter. Gradients are reduce-scattered at every micro step (overlapped
        # with backward): accumulated unsharded, they would hold 4 bytes a parameter on every GPU, what sharding saves
        # (a process group of its own: DTensor's caches keep it to Python's exit; main ends the default one before)
        mesh = DeviceMesh.from_group(dist.new_group(timeout=TIMEOUT), device_type)
        for block in model.transformer.h:
            if use_compile:
                block.compile()
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, model
    raw_model = model
    if use_compile:
        model = torch.compile(model)
    if ddp and not args.eval_only:  # (buckets as .grad: no second copy)
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, gradient_as_bucket_view=True)
    return model, raw_model

def rekey(state, keys):  # an optimizer state dict with its parameters' keys mapped: names to indices, or back
    return {"state": {keys[k]: s for k, s in state["state"].items()},
            "param_groups": [dict(group, params=[keys[k] for k in group["params"]]) for group in state["param_groups"]]}

def full_state(model, optimizer, fsdp):
    """The model's and optimizer's state dicts in a checkpoint's format; under FSDP gathered to rank 0 (all call it)."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    options = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = dcp.get_model_state_dict(model, options=options)  # (first: the optimizer's then finds its names)
    state = dcp.get_optimizer_state_dict(model, optimizer, options=options)  # (by name; on rank 0, else {})
    index = {name: i for i, name in enumerate(parameter_names(model, optimizer))}
    return model_state, rekey(state, index) if state else {}

def load_optimizer_state(model, optimizer, state, fsdp):
    """A checkpoint's optimizer state, written by one process, by DDP or by FSDP, on any number of ranks."""
    if fsdp:  # (each rank keeps its shard of every tensor)
        options = dcp.StateDictOptions(full_state_dict=True)
        dcp.set_optimizer_state_dict(model, optimizer, rekey(state, parameter_names(model, optimizer)), options=options)
    else:
        optimizer.load_state_dict(state)

def parameter_names(model, optimizer):  # the parameters' names, in the order optimizer.state_dict() numbers them
    name = {id(p): n for n, p in model.named_parameters()}
    return [name[id(p)] for group in optimizer.param_groups for p in group["params"]]

def state_bytes(model, optimizer):
    """The bytes of parameters, gradients and optimizer state this process holds (under FSDP: its shards)."""
    tensors = [t for p in model.parameters() for t in (p, p.grad) if t is not None]
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in local}.values())  # (shared: once)

# -----------------------------------------------------------------------------
# training
def claim_log_dir(log_dir, resume):
    """One run per log_dir: a lock the kernel drops when the process ends. A fresh run moves an earlier one aside."""
    try:
        os.makedirs(log_dir, exist_ok=True)
        lock = open(os.path.join(log_dir, "lock"), "a+")
        if os.name == "posix":  # (no lock on Windows)
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        raise UsageError(f"--log_dir {log_dir} is in use by another run (pid {lock.read()}); give another")
    except OSError as e:
        raise UsageError(f"cannot write to --log_dir {log_dir} ({e.strerror}); give another")
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    for tmp in glob.glob(os.path.join(log_dir, "*.tmp")):
        os.remove(tmp)
    old = [f for f in os.listdir(log_dir) if f == "log.txt" or f.startswith("model_")]
    if old and not (resume and os.path.samefile(os.path.dirname(resume) or ".", log_dir)):
        dest = os.path.join(log_dir, "previous-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f"))
        os.makedirs(dest)
        for f in old:
            os.replace(os.path.join(log_dir, f), os.path.join(dest, f))
        print(f"{log_dir} held an earlier run: moved to {dest}")
    return lock

def train(args, why, ckpt):
    ddp = int(os.environ.get("RANK", -1)) != -1  # DDP: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
    ddp_rank = int(os.environ.get("RANK", 0))
    ddp_local_rank = int(os.environ.get("LOCAL_RANK", 0))
    ddp_world_size = int(os.environ.get("WORLD_SIZE", 1))
    master_process = ddp_rank == 0  # logs and writes the checkpoints
    device = pick_device(args.device)
    device_type = device.split(":")[0]
    if device == "cuda":
        device = f"cuda:{ddp_local_rank}"
    if device_type == "cuda":  # (first: then each rank's CUDA calls, pick_dtype's too, ask its own GPU)
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 for the matmuls outside autocast
    dtype, dtype_why = pick_dtype(args.dtype, device_type)
    use_compile = bool(args.compile) if args.compile is not None else device_type == "cuda" and not args.eval_only
    fsdp = bool(args.fsdp) and ddp_world_size > 1  # (one process: nothing to shard)
    bench = args.benchmark
    B, T = args.B, args.T
    total_batch_size = args.total_batch_size
    grad_accum_steps = total_batch_size // (B * T * ddp_world_size)

    def print0(*a):
        if master_process:
            print(*a, flush=True)
    data, note = find_data(args.data)
    args.data = data  # (for a resumed run and the notebook)
    print0(f"preset: {args.preset} ({why}); data: {data}{' (' + note + ')' if note else ''}")
    parallel = "FSDP" if fsdp else "DDP" if ddp else "one process" + (" (nothing to shard)" if args.fsdp else "")
    print0(f"device: {device_type} x {ddp_world_size}; dtype: {str(dtype)[6:]} ({dtype_why}); compile: {use_compile}; "
           f"{parallel}; activation checkpointing: {bool(args.activation_checkpointing)}")
    train_loader = None
    if not args.eval_only:
        print0(f"total desired batch size: {total_batch_size}")
        print0(f"=> calculated gradient accumulation steps: {grad_accum_steps}")
        train_loader = DataLoaderLite(B, T, ddp_rank, ddp_world_size, "train", data, args.vocab_size, args.shuffle,
                                      args.seed, device)
    val_loader = DataLoaderLite(B, T, ddp_rank, ddp_world_size, "val", data, args.vocab_size, device=device)
    val_steps = min(args.val_steps, sum((n - 1) // (B * T * ddp_world_size) for n in val_loader.sizes))  # all distinct
    if val_steps < args.val_steps:
        print0(f"val: {val_steps} batches of B*T*world_size tokens, all there are, not --val_steps {args.val_steps}")
    chats = val_loader.chats  # conversations: the samples answer the first val one's first user turn
    prompt = chats[0][0][:chats[0][1].argmax()].tolist() if chats else "Hello, I'm a language model,"
    writes = master_process and not bench and not args.eval_only  # (log.txt and checkpoints)
    _lock = claim_log_dir(args.log_dir, args.resume) if writes else None  # (held to the end)

    if ddp:  # nccl between GPUs, gloo between CPUs
        backend = "nccl" if device_type == "cuda" else "gloo"
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt in (None, "0") or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            dist.init_process_group(backend, timeout=TIMEOUT)
        else:  # a torchrun restart: store keys of its own
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
            store = dist.PrefixStore(f"attempt{attempt}", store)
            dist.init_process_group(backend, store=store, rank=ddp_rank, world_size=ddp_world_size, timeout=TIMEOUT)
    torch.manual_seed(args.seed)  # (the CPU's and every GPU's)
    # HellaSwag: read now, so a bad file shows before step 0
    examples = hellaswag.load_for_training(ddp_rank, ddp_world_size, device) if args.hellaswag and not bench else []

    if ckpt:  # the model: the checkpoint's, pretrained, or new
        model = GPT.from_pretrained(args.resume or args.init_from, ckpt)
    else:
        model = GPT(GPTConfig(**{k: getattr(args, k) for k in MODEL_KEYS}))
    config = model.config
    clash = [k for k in MODEL_KEYS if k in args.given and getattr(args, k) != getattr(config, k)]
    if clash:
        raise UsageError(f"the model has {', '.join(f'{k}={getattr(config, k)}' for k in clash)}: drop those flags")
    if T > config.block_size:
        raise UsageError(f"--T {T} is longer than the model's block size {config.block_size}")
    n_params = sum(p.numel() for p in model.parameters())
    if args.lora_rank and not model.lora:  # new adapters (B = 0: the model starts as the base); resumed: ckpt's
        model.add_lora(args.lora_rank, args.lora_alpha)
    flops_per_token = model.flops_per_token(T)
    if model.lora and dtype != torch.float32:  # the frozen weights in the compute dtype: 2 bytes a parameter
        for p in [p for p in model.parameters() if not p.requires_grad]:
            p.data = p.data.to(dtype)  # (before the GPU: it never holds them in float32)
    model.to(device)
    model, raw_model = parallelize(model, args, device_type, use_compile, fsdp, ddp, ddp_local_rank)
    print0(f"model: {n_params:,} parameters, {config}")
    eager = fsdp and use_compile  # (under FSDP, sampling and HellaSwag run the compiled blocks eagerly: shapes vary)

    def log(line):  # log.txt, appended
        if writes:
            with open(os.path.join(args.log_dir, "log.txt"), "a") as f:
                f.write(line + "\n")

    def evaluate(step):
        """Val loss (val_steps batches a rank, all ranks') and HellaSwag, printed and logged."""
        model.eval()
        val_loader.reset()
        with torch.no_grad():
            val_loss_accum = torch.zeros((), device=device)
            for x, y, weight in val_loader.next_step(val_steps):  # (weight: see next_step)
                with torch.autocast(device_type, dtype, enabled=dtype != torch.float32):
                    loss = model(x, y)[1]
                val_loss_accum += loss.detach() / val_steps * weight
        if ddp:
            dist.all_reduce(val_loss_accum, op=dist.ReduceOp.SUM)  # (gloo has no AVG)
        r = dict(val_loss=val_loss_accum.item() / ddp_world_size, val_tokens=val_steps * B * T * ddp_world_size,
                 hellaswag_acc=None, hellaswag_acc_norm=None, hellaswag_examples=None)
        print0(f"step {step:5d} | val loss: {r['val_loss']:.4f}")
        log(f"{step} val {r['val_loss']:.4f}")
        if examples:
            with torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext():
                n_norm, n, total = hellaswag.evaluate(raw_model, examples, device, ddp_rank, ddp_world_size,
                                                      config.block_size, dtype, compile=use_compile and not fsdp)
            r.update(hellaswag_acc=n / total, hellaswag_acc_norm=n_norm / total, hellaswag_examples=total)
            print0(f"step {step:5d} | HellaSwag accuracy: {n_norm}/{total}={n_norm / total:.4f} (acc {n / total:.4f})")
            log(f"{step} hella {n_norm / total:.4f}")
        return r

    if args.eval_only:  # the loop's evaluation, once: nothing trained or written
        result = evaluate(0)
        result.update(model=args.init_from or args.resume, data=data, B=B, T=T, val_steps=val_steps,
                      val_steps_asked=args.val_steps, dtype=str(dtype)[6:], world_size=ddp_world_size)
        print0(json.dumps(result))
        return 0
    max_steps = args.max_steps
    print0(f"schedule: warmup {args.warmup_steps} steps to max_lr {args.max_lr:g}, cosine to min_lr {args.min_lr:g} at "
           f"{max_steps}")
    optimizer = raw_model.configure_optimizers(args.weight_decay, args.max_lr, device_type, master_process)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)  # float16: a scaled loss
    start_step = 0
    if args.resume:
        load_optimizer_state(raw_model, optimizer, ckpt["optimizer"], fsdp)
        if ckpt["scaler"] or not scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        else:
            print0("the checkpoint has no gradient scaler (a bfloat16 or float32 run): float16 starts a new one")
        train_loader.load_state_dict(ckpt["train_loader"])
        start_step = ckpt["step"]
        print0(f"resumed from {args.resume} at step {start_step} (written by {ckpt['world_size']} processes)")
    del ckpt

    def save_checkpoint(step):
        """After `step` updates; a failed write stops the run, the earlier ones intact."""
        nonlocal last_checkpoint
        path = os.path.join(args.log_dir, f"model_{step:05d}.pt")
        error = None
        if fsdp or master_process:  # (under FSDP a collective: every rank gathers its shards)
            model_state, optimizer_state = full_state(raw_model, optimizer, fsdp)
        if master_process:
            buf = io.BytesIO()  # (then a failed write is an OSError)
            torch.save({"model": model_state, "optimizer": optimizer_state, "scaler": scaler.state_dict(),
                        "config": asdict(config), "lora": raw_model.lora, "step": step, "args": vars(args),
                        "world_size": ddp_world_size, "train_loader": train_loader.state_dict(),
                        "val_loss": val_loss if val_step == step else None}, buf)
            try:
                with atomic_write(path) as tmp, open(tmp, "wb") as f:
                    f.write(buf.getbuffer())
                last_checkpoint = path
                print0(f"step {step:5d} | saved {path}")
            except OSError as e:
                error = f"could not write {path} ({e.strerror}); the earlier checkpoints are intact"
        if ddp:  # (and the barrier after the write)
            failed = torch.tensor(error is not None, dtype=torch.long, device=device)
            dist.all_reduce(failed)
            error = error or (f"rank 0 could not write {path}" if failed else None)
        if error:
            raise UsageError(error)

    stop = []  # SIGTERM or Ctrl-C: end the step, checkpoint, stop. Ctrl-C again: at once; SIGTERM again changes nothing
    # (a scheduler that signals every process, and torchrun, which passes its own on, send each rank two)

    def on_signals(read):  # (a thread of its own: see below)
        while signum := os.read(read, 1):
            name = signal.Signals(signum[0]).name
            if not stop:
                stop.append(signum[0])
                print0(f"{name}: the step in progress will finish" + ("" if bench else " and be saved")
                       + ", then the run stops; Ctrl-C again stops at once")
            elif signal.SIGINT in (signum[0], stop[0]):  # (a second Ctrl-C: torchrun passes it on as SIGTERM)
                print0(f"stopped at once by {name}: the step in progress is lost; the last checkpoint is "
                       f"{last_checkpoint or 'none'}")
                os._exit(128 + signal.SIGINT)
    device_name = torch.cuda.get_device_name(device) if device_type == "cuda" else device_type
    peak = PEAK_FLOPS.get(device_name) if dtype != torch.float32 else None

    def mfu(tokens_per_sec):
        return flops_per_token * tokens_per_sec / ddp_world_size / peak
    val_loss = None  # the last val loss, and the step of the weights it measured
    val_step = None
    best = (math.inf, 0)
    last_checkpoint = args.resume
    step_times = []
    t_start = time.time()
    # signals reach on_signals at once: the main thread may be in one long backward, where Python runs no handler
    read, write = os.pipe()
    os.set_blocking(write, False)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    signal.set_wakeup_fd(write)
    threading.Thread(target=on_signals, args=(read,), daemon=True).start()
    for step in range(start_step, max_steps + 1):
        last_step = step == max_steps
        # now and then: val loss, HellaSwag, samples, checkpoint
        if not bench and (step % args.eval_interval == 0 or last_step):
            val_loss = evaluate(step)["val_loss"]
            val_step = step
            best = min(best, (val_loss, step))
            if step > 0:
                with torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext():
                    texts = raw_model.generate_text(prompt, 4, len(prompt) + 32 if chats else 32, 42 + ddp_rank,
                                                    dtype=dtype)
                for i, text in enumerate(texts):
                    text = text.split("<|endoftext|>")[1].replace("\n", " ") if chats else text  # (the exchange)
                    print(f"{f'rank {ddp_rank} ' if ddp else ''}sample {i}: {text}", flush=True)
        if not bench and step > start_step and (step % args.checkpoint_interval == 0 or last_step):
            save_checkpoint(step)
        if last_step:
            break

        # one optimization step: grad_accum_steps micro batches of B*T tokens per process
        model.train()
        t0 = time.time()
        optimizer.zero_grad()
        loss_accum = torch.zeros((), device=device)
        try:
            batches = train_loader.next_step(grad_accum_steps)  # [(x, y, weight)], read first: weight needs them all
        except UsageError as e:  # a shard with bad token ids, read for the first time
            raise UsageError(f"{e}, then --resume {last_checkpoint}" if last_checkpoint else str(e))
        for micro_step, (x, y, weight) in enumerate(batches):
            if ddp and not fsdp:  # sync gradients on the last micro step only
                model.require_backward_grad_sync = (micro_step == grad_accum_steps - 1)
            with torch.autocast(device_type, dtype, enabled=dtype != torch.float32):  # (float32: off)
                loss = model(x, y)[1]  # (logits not kept into the next micro step)
            loss = loss / grad_accum_steps  # the gradients add up: so their sum is a mean
            loss = loss * weight  # conversations: a batch weighs as many reply tokens as it holds (text: 1.0)
            loss_accum += loss.detach()
            scaler.scale(loss).backward()
        # the ranks' losses and their stop requests (SIGTERM, Ctrl-C) in one all_reduce: all stop at the same step
        stop_requests = torch.full_like(loss_accum, len(stop))
        loss_and_stop = torch.stack([loss_accum, stop_requests])
        if ddp:
            dist.all_reduce(loss_and_stop, op=dist.ReduceOp.SUM)
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if fsdp:
            norm = norm.full_tensor()  # (the norm over all shards, the same on every rank)
        lr = get_lr(step, args.max_lr, args.min_lr, args.warmup_steps, max_steps)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        scaler.step(optimizer)  # (float16: skipped on an inf/NaN gradient)
        scaler.update()
        if device_type == "cuda":
            torch.cuda.synchronize()  # the step's real time
        dt = time.time() - t0
        loss_sum, stops, norm = torch.cat([loss_and_stop, norm.float().reshape(1)]).tolist()  # one host copy
        loss_value = loss_sum / ddp_world_size
        if not math.isfinite(loss_value) or not (math.isfinite(norm) or scaler.is_enabled()):
            raise UsageError(f"step {step}: the loss or gradient norm is not finite, the run diverged; lower "
                             f"--max_lr or check the data, and --resume {last_checkpoint}")
        step_times.append(dt)
        tokens_per_sec = total_batch_size / dt
        eta = datetime.timedelta(seconds=round(np.median(step_times[-20:]) * (max_steps - step - 1)))
        print0(f"step {step:5d} | loss: {loss_value:.6f} | lr {lr:.4e} | norm: {norm:.4f} | dt: {dt * 1000:.2f}ms | "
               f"tok/sec: {tokens_per_sec:.2f}"
               + (f" | mfu: {100 * mfu(tokens_per_sec):.2f}%" if peak else "")
               + (f" | eta {eta}" if len(step_times) >= 5 else "")
               + ("" if math.isfinite(norm) else " | skipped: inf/NaN gradient"))
        log(f"{step} train {loss_value:.6f}")
        if step == start_step:  # (now that the gradients and AdamW's moments exist)
            print0(f"state per rank: {state_bytes(raw_model, optimizer) / 2**30:.4g} GiB (parameters, grads, AdamW)")
        if stops:
            if not bench:
                save_checkpoint(step + 1)
            signum = stop[0] if stop else signal.SIGTERM  # (or another rank's)
            print0(f"stopped by {signal.Signals(signum).name} after step {step}" + ("" if bench else f": saved "
                   f"{last_checkpoint}; go on with python train_gpt2.py --resume auto --log_dir {args.log_dir}"))
            return 128 + signum
        if bench and len(step_times) >= bench:
            break

    if bench:  # the steady state: without the first steps
        ms = 1000 * float(np.median(step_times[len(step_times) // 5:]))
        memory = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device_type == "cuda" else None
        tok_s = 1000 * total_batch_size / ms
        print0(json.dumps(dict(
            tok_per_sec=round(tok_s, 1), ms_per_step=round(ms, 2), mfu=round(mfu(tok_s), 4) if peak else None,
            peak_memory_gib=memory, state_gib_per_rank=round(state_bytes(raw_model, optimizer) / 2**30, 4),
            preset=args.preset, n_params=n_params, **asdict(config), B=B, T=T, grad_accum_steps=grad_accum_steps,
            total_batch_size=total_batch_size, world_size=ddp_world_size, fsdp=fsdp, dtype=str(dtype)[6:],
            activation_checkpointing=bool(args.activation_checkpointing), compile=use_compile, device=device_name,
            torch=torch.__version__, cuda=torch.version.cuda, steps=len(step_times), lora=raw_model.lora)))
    else:
        print0(f"done in {datetime.timedelta(seconds=round(time.time() - t_start))}: final val loss {val_loss:.4f}, "
               f"best {best[0]:.4f} at step {best[1]}; sample with python train_gpt2.py --init_from {last_checkpoint} "
               f"--sample \"Hello\"")
    return 0

def main(argv=None):
    error = None
    code = 0
    try:
        args, why, ckpt = parse_config(argv, int(os.environ.get("WORLD_SIZE", 1)))
        if args.sample is not None or args.export_hf or args.chat:
            command(args, ckpt)
        else:
            code = train(args, why, ckpt)
    except UsageError as e:
        error = str(e)  # (the exception, and the frames of train it holds, end with this block)
    except torch.OutOfMemoryError:
        sys.exit("train_gpt2.py: error: out of device memory: give a smaller --B (accumulation keeps the batch)")
    except KeyboardInterrupt:
        sys.exit("train_gpt2.py: interrupted")
    if dist.is_initialized():  # (after train's DDP model is gone, else a hang: gloo's threads end here, not in
        dist.destroy_process_group()  # Python's exit, where one that frees a tensor can abort the process)
    if error and int(os.environ.get("RANK", 0)) == 0:
        print(f"train_gpt2.py: error: {error}", file=sys.stderr, flush=True)  # (rank 0 alone)
    if error or code:  # (code: a stop signal's)
        sys.exit(1 if error else code)

if __name__ == "__main__":
    main()
