"""
Reproduce GPT-2 (124M): the model, the data loader and the training loop, in one file.

    python train_gpt2.py                                        # picks a preset that fits this machine
    torchrun --standalone --nproc_per_node=8 train_gpt2.py      # the full recipe on 8 GPUs

The defaults are the lecture's recipe: 10B FineWeb-Edu tokens (python fineweb.py), 19073 steps of
524288 tokens, AdamW with a cosine schedule, bf16 autocast, torch.compile, flash attention and DDP.
Without FineWeb shards the same command trains a small GPT on input.txt (Shakespeare) instead.
Every value can be changed from the command line: python train_gpt2.py --help
"""

import argparse
import datetime
import glob
import inspect
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2_tokenizer import EOT, get_encoding

HERE = os.path.dirname(os.path.abspath(__file__))
OPENAI_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# OpenAI's checkpoints keep these four as Conv1D, i.e. (in, out); nn.Linear wants (out, in)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class UsageError(Exception):
    """A problem with the user's input: printed as one line that says what to change, exit status 1."""


# -----------------------------------------------------------------------------
# The model: GPT-2 as OpenAI's code defines it, written the way PyTorch likes it


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # key, query and value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True  # adds to the residual stream: see GPT._init_weights
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def forward(self, x):
        B, T, C = x.size()  # batch, sequence length, embedding dimension (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        # flash attention: the (T, T) attention matrix is never written to memory
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.c_proj(y)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # the approximation GPT-2 was trained with
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        # pre-LayerNorm: the residual stream itself is never normalised, so gradients flow straight down
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length
    vocab_size: int = 50257  # 50,000 BPE merges + 256 byte tokens + 1 <|endoftext|> token
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        # the module order below is the lecture's: the default inits draw from the RNG in this order, so one
        # seed gives the same initial weights as the lecture's script
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the token embedding and the output projection are one tensor (GPT-2 does this;
        # it saves 38M parameters at 124M and tokens that look alike in, look alike out)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE_INIT", False):
                # each block adds to the residual stream twice (attn, mlp): scale those projections so the
                # stream's variance does not grow with depth
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        # idx: (B, T) token ids; targets: (B, T) next-token ids, -1 where no loss is wanted
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of length {T} exceeds block_size {self.config.block_size}"
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, n_embd), positions broadcast
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    # -- loading weights -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path):
        """GPT-2 weights from OpenAI (by name), a transformers directory, or one of our log/model_*.pt."""
        if name_or_path not in OPENAI_MODELS and os.path.isfile(name_or_path):
            ckpt = load_checkpoint(name_or_path)
            model = cls(GPTConfig(**ckpt["config"]))
            model.load_state_dict(ckpt["model"])
            return model
        if name_or_path not in OPENAI_MODELS and not os.path.isdir(name_or_path):
            raise UsageError(f"no model '{name_or_path}': give one of {', '.join(OPENAI_MODELS)}, a directory "
                             f"written by GPT2LMHeadModel.save_pretrained, or a log/model_*.pt checkpoint")
        from transformers import GPT2LMHeadModel
        try:
            model_hf = GPT2LMHeadModel.from_pretrained(name_or_path)
        except OSError as e:
            raise UsageError(f"could not load '{name_or_path}' through transformers ({str(e).splitlines()[0]}); "
                             f"without internet, point at a local copy: a directory written by save_pretrained")
        return cls.from_hf(model_hf)

    @classmethod
    def from_hf(cls, model_hf):
        """Our GPT with the weights of a transformers GPT2LMHeadModel."""
        c = model_hf.config
        unsupported = {"activation_function": c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"),
                       "scale_attn_by_inverse_layer_idx": c.scale_attn_by_inverse_layer_idx,
                       "reorder_and_upcast_attn": c.reorder_and_upcast_attn,
                       "layer_norm_epsilon": c.layer_norm_epsilon != 1e-5, "scale_attn_weights": not c.scale_attn_weights}
        if any(unsupported.values()):
            raise UsageError(f"this GPT-2 variant uses {[k for k, v in unsupported.items() if v]}, which this GPT does not implement")
        config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                           n_embd=c.n_embd)
        model = cls(config)
        sd = model.state_dict()
        sd_hf = {k: v for k, v in model_hf.state_dict().items()
                 if not k.endswith((".attn.masked_bias", ".attn.bias"))}  # causal-mask buffers, not weights
        if "lm_head.weight" not in sd_hf:  # tied checkpoints may store the shared tensor once
            sd_hf["lm_head.weight"] = sd_hf["transformer.wte.weight"]
        if set(sd_hf) != set(sd):
            raise UsageError(f"unexpected GPT-2 weights: missing {sorted(set(sd) - set(sd_hf))[:3]}, "
                             f"extra {sorted(set(sd_hf) - set(sd))[:3]}")
        with torch.no_grad():
            for k, v in sd_hf.items():
                v = v.t() if k.endswith(CONV1D_WEIGHTS) else v
                assert v.shape == sd[k].shape, f"{k}: {tuple(v.shape)} vs {tuple(sd[k].shape)}"
                sd[k].copy_(v)
        return model

    def to_hf(self):
        """A transformers GPT2LMHeadModel with our weights (the reverse of from_hf)."""
        from transformers import GPT2Config, GPT2LMHeadModel
        c = self.config
        config_hf = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                               n_head=c.n_head, activation_function="gelu_new", tie_word_embeddings=True,
                               bos_token_id=EOT, eos_token_id=EOT)
        model_hf = GPT2LMHeadModel(config_hf)
        sd_hf = model_hf.state_dict()
        with torch.no_grad():
            for k, v in self.state_dict().items():
                sd_hf[k].copy_(v.t() if k.endswith(CONV1D_WEIGHTS) else v)
        return model_hf

    def crop_block_size(self, block_size):
        """Shrink the context (e.g. fine-tune GPT-2 with T=256): keep the first block_size position embeddings."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].detach().clone())

    # -- training helpers ------------------------------------------------------------------------------

    def configure_optimizers(self, weight_decay, learning_rate, device_type, verbose=True):
        params = [p for p in self.parameters() if p.requires_grad]
        # decay the matrices (matmul weights, embeddings); biases and LayerNorm gains are left alone
        decay_params = [p for p in params if p.dim() >= 2]
        nodecay_params = [p for p in params if p.dim() < 2]
        optim_groups = [
            {"params": decay_params, "weight_decay": weight_decay},
            {"params": nodecay_params, "weight_decay": 0.0},
        ]
        if verbose:
            print(f"num decayed parameter tensors: {len(decay_params)}, with {sum(p.numel() for p in decay_params):,} parameters")
            print(f"num non-decayed parameter tensors: {len(nodecay_params)}, with {sum(p.numel() for p in nodecay_params):,} parameters")
        # the fused kernel does the whole update in one launch instead of a loop of small ones
        fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type == "cuda"
        if verbose:
            print(f"using fused AdamW: {fused}")
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)

    def num_params(self, non_embedding=True):
        # the position embeddings do no matmul work, so FLOP counts leave them out (wte counts: it is lm_head)
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, T):
        """Training FLOPs per token (forward + backward), nanoGPT's estimate: 6N for the matmuls with weights,
        plus the attention scores and their weighted sum, which grow with the sequence length T."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * T

    @torch.no_grad()
    def generate(self, idx, max_length, top_k=50, temperature=1.0, generator=None, vocab_limit=50257):
        """Sample until each row of idx (B, T0) is max_length tokens long: top-k sampling, as the lecture.
        Runs uncompiled on purpose: a growing sequence would make torch.compile recompile for every new
        length, and 4x32 tokens cost nothing eagerly. Tokens past vocab_limit (the padding up to 50304)
        are never sampled, so the result always decodes."""
        while idx.size(1) < max_length:
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :vocab_limit].float() / temperature  # (B, vocab)
            probs = F.softmax(logits, dim=-1)
            topk_probs, topk_indices = torch.topk(probs, min(top_k, probs.size(-1)), dim=-1)  # (B, k)
            ix = torch.multinomial(topk_probs, 1, generator=generator)  # (B, 1), renormalises by itself
            idx = torch.cat((idx, torch.gather(topk_indices, -1, ix)), dim=1)
        return idx

    def generate_text(self, prompt, num_samples=4, max_length=32, seed=42, top_k=50, temperature=1.0, bf16=False):
        """num_samples continuations of prompt, each max_length tokens in all (prompt included), as strings:
        the training loop's samples and the --sample command."""
        enc = get_encoding()
        device = self.lm_head.weight.device
        tokens = enc.encode(prompt) or [EOT]  # an empty prompt starts from <|endoftext|>
        idx = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(0).repeat(num_samples, 1)
        rng = torch.Generator(device=device).manual_seed(seed)
        was_training = self.training
        self.eval()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            idx = self.generate(idx, max_length, top_k=top_k, temperature=temperature, generator=rng)
        self.train(was_training)
        return [enc.decode(row.tolist()) for row in idx]


# -----------------------------------------------------------------------------
# Data: uint16 token shards written by fineweb.py, or a plain text file


def load_tokens(filename):
    """A shard as a read-only memory map: switching shards costs nothing and no rank holds 800 MB of int64."""
    try:
        tokens = np.load(filename, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UsageError(f"shard {filename} is truncated or is not a .npy file ({e}); delete it and re-run "
                         f"fineweb.py, which rebuilds missing shards")
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise UsageError(f"shard {filename} holds {tokens.dtype} of shape {tokens.shape}, expected a 1-D uint16 "
                         f"array of GPT-2 token ids as fineweb.py writes")
    return tokens


_TEXT_CACHE = {}


def load_text_split(path, split):
    """A .txt file as GPT-2 tokens: the first 90% for train, the rest for val (as nanoGPT's Shakespeare)."""
    key = (os.path.abspath(path), os.path.getmtime(path))
    if key not in _TEXT_CACHE:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        _TEXT_CACHE[key] = np.array(get_encoding().encode_ordinary(text), dtype=np.uint16)
    tokens = _TEXT_CACHE[key]
    n = int(0.9 * len(tokens))
    return tokens[:n] if split == "train" else tokens[n:]


def find_shards(data_root, split):
    return sorted(f for f in glob.glob(os.path.join(data_root, "*.npy")) if split in os.path.basename(f))


DEFAULT_DATA = os.path.join(HERE, "edu_fineweb10B")  # where fineweb.py writes
FALLBACK_TEXT = os.path.join(HERE, "input.txt")


def resolve_data(data_root=None):
    """Where the tokens come from: (path, note). A directory without shards, or the default FineWeb directory
    before fineweb.py has made it, means input.txt, and the note says so; otherwise the note is None."""
    data_root = data_root or DEFAULT_DATA
    no_shards = os.path.isdir(data_root) and not (find_shards(data_root, "train") or find_shards(data_root, "val"))
    if no_shards or (data_root == DEFAULT_DATA and not os.path.exists(data_root)):
        return FALLBACK_TEXT, f"no token shards in {data_root} (python fineweb.py makes them): using {FALLBACK_TEXT}"
    return data_root, None


class DataLoaderLite:
    """Rank r of W reads B*T+1 tokens at position B*T*r and then moves on by B*T*W, so the ranks read
    interleaved, disjoint blocks. It goes on to the next shard (wrapping around) exactly when its next read
    would not fit in the current one, so no read runs past the end and no whole block is skipped.
    data_root: a directory of shards, or a .txt file. A directory without shards falls back to input.txt."""

    def __init__(self, B, T, process_rank=0, num_processes=1, split="train", data_root=None, master_process=True):
        assert split in {"train", "val"}
        self.B, self.T = B, T
        self.process_rank, self.num_processes = process_rank, num_processes
        self.split = split
        data_root, note = resolve_data(data_root)
        if note and master_process:
            print(note)
        self.data_root = data_root
        if os.path.isfile(data_root):
            self.shard_names = [f"{data_root}[{split}]"]
            self.shards = [load_text_split(data_root, split)]
        else:
            self.shard_names = find_shards(data_root, split)
            if not self.shard_names:
                raise UsageError(f"no {split} shards (*{split}*.npy) in {data_root}; fineweb.py writes shard 0 as "
                                 f"val and the rest as train")
            self.shards = [load_tokens(f) for f in self.shard_names]  # opens every header now: bad files fail early
        need = B * T * num_processes + 1
        if max(len(s) for s in self.shards) < need:
            raise UsageError(f"{split} data too small: its largest shard has {max(len(s) for s in self.shards):,} "
                             f"tokens but one step of B*T*world_size+1 = {need:,} tokens needs more; lower --B or --T")
        if master_process:
            print(f"found {len(self.shards)} shard(s) for split {split}: {sum(len(s) for s in self.shards):,} tokens")
        self.reset()

    def reset(self):
        self.current_shard = 0
        self.current_position = self.B * self.T * self.process_rank
        if not self._fits():
            self._next_shard()

    def _fits(self):
        return self.current_position + self.B * self.T + 1 <= len(self.shards[self.current_shard])

    def _next_shard(self):
        while True:  # skip shards too short for even this rank's first read (e.g. a small last shard)
            self.current_shard = (self.current_shard + 1) % len(self.shards)
            self.current_position = self.B * self.T * self.process_rank
            if self._fits():
                return

    def next_batch(self):
        B, T = self.B, self.T
        buf = self.shards[self.current_shard][self.current_position: self.current_position + B * T + 1]
        buf = torch.from_numpy(buf.astype(np.int64))
        x = buf[:-1].view(B, T)  # inputs
        y = buf[1:].view(B, T)  # targets: the next token at every position
        self.current_position += B * T * self.num_processes
        if not self._fits():
            self._next_shard()
        return x, y

    # the position is all the state there is: a resumed run reads exactly the batches it would have read
    def state_dict(self):
        return {"current_shard": self.current_shard, "current_position": self.current_position, "B": self.B,
                "T": self.T, "process_rank": self.process_rank, "num_processes": self.num_processes,
                "num_shards": len(self.shards)}

    def load_state_dict(self, state):
        mine = self.state_dict()
        for k in ("B", "T", "process_rank", "num_processes", "num_shards"):
            if state[k] != mine[k]:
                raise UsageError(f"the checkpoint's data loader had {k}={state[k]} but this run has {k}={mine[k]}; "
                                 f"resume with the same --B, --T, number of processes and data")
        self.current_shard, self.current_position = state["current_shard"], state["current_position"]


# -----------------------------------------------------------------------------
# Learning rate schedule, throughput accounting, checkpoints


def get_lr(it, max_lr=6e-4, min_lr=6e-5, warmup_steps=715, max_steps=19073):
    # 1) linear warmup for warmup_steps steps (step 0 already gets a small non-zero lr)
    if it < warmup_steps:
        return max_lr * (it + 1) / warmup_steps
    # 2) after max_steps, hold min_lr
    if it > max_steps:
        return min_lr
    # 3) in between, cosine decay from max_lr down to min_lr
    decay_ratio = (it - warmup_steps) / max(1, max_steps - warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # starts at 1 and goes to 0
    return min_lr + coeff * (max_lr - min_lr)


# dense bf16 tensor-core peak of one device, for MFU; matched against torch.cuda.get_device_name() in order
PEAK_BF16_FLOPS = [
    ("GH200", 989e12), ("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12),
    ("H800", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("L4", 121e12), ("A6000", 155e12), ("RTX 6000 Ada", 364e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
    ("A10", 125e12), ("MI300X", 1307e12),
]


def peak_flops(device_type):
    """The device's peak bf16 FLOP/s, or None where we do not know it (CPU, MPS, an unlisted GPU)."""
    if device_type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def load_checkpoint(path):
    """Load a checkpoint to the CPU (no GPU memory spike) without unpickling arbitrary objects: weights_only
    lets through tensors and plain data only, so a crafted file cannot run code."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"cannot load checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]} "
                         f"(only files written by train_gpt2.py load; a truncated or foreign file does not)")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UsageError(f"{path} is not a train_gpt2.py checkpoint (no 'model' and 'config' entries)")
    return ckpt


def save_atomic(obj, path):
    """torch.save to a temporary name in the same directory, then rename: a crash mid-write leaves the old
    file (or none), never a half-written one under the real name."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def latest_checkpoint(log_dir):
    """The newest log_dir/model_XXXXX.pt by step, or None."""
    steps = {}
    for path in glob.glob(os.path.join(log_dir, "model_*.pt")):
        step = os.path.basename(path)[len("model_"):-len(".pt")]
        if step.isdigit():
            steps[int(step)] = path
    return steps[max(steps)] if steps else None


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -----------------------------------------------------------------------------
# Configuration: the lecture's recipe, smaller presets for machines without FineWeb or a GPU, the flags

RECIPE = dict(  # GPT-2 124M on 10B tokens of FineWeb-Edu, as the lecture runs it
    B=64, T=1024, total_batch_size=524288, max_lr=6e-4, min_lr=None, warmup_steps=715, max_steps=19073,
    weight_decay=0.1, n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304,
    eval_interval=250, val_steps=20, checkpoint_interval=5000, hellaswag=True, seed=1337,
)
PRESETS = {
    "gpt2": {},
    # a GPU without FineWeb shards: a 10M-parameter GPT on Shakespeare (block 256, 6 layers, 6 heads, 384 wide)
    "shakespeare-gpu": dict(B=64, T=256, total_batch_size=64 * 256, n_layer=6, n_head=6, n_embd=384,
                            block_size=256, max_lr=1e-3, warmup_steps=100, max_steps=2000, checkpoint_interval=1000,
                            hellaswag=False),
    # a laptop: nanoGPT's CPU Shakespeare size (block 64, 4 layers, 4 heads, 128 wide), about 10 minutes on 2 cores
    "shakespeare-cpu": dict(B=16, T=64, total_batch_size=16 * 64, n_layer=4, n_head=4, n_embd=128, block_size=64,
                            max_lr=1e-3, warmup_steps=100, max_steps=800, eval_interval=200, val_steps=20,
                            checkpoint_interval=800, hellaswag=False),
}
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")


def shape_clash(args, config, skip=()):
    """The model-shape flags given that contradict config: {name: (config's value, the flag's value)}."""
    given = {k: getattr(args, k) for k in MODEL_KEYS if k not in skip and getattr(args, k) is not None}
    return {k: (getattr(config, k), v) for k, v in given.items() if v != getattr(config, k)}


def str2bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 1/0 (or true/false), got '{s}'")


def build_parser():
    p = argparse.ArgumentParser(description="Train GPT-2 (124M) as in 'Let's reproduce GPT-2'. Any flag left out "
                                            "takes the preset's value (see --preset).")
    a = p.add_argument
    a("--preset", choices=["auto"] + list(PRESETS), default="auto",
      help="auto: gpt2 (the lecture's recipe) on CUDA with FineWeb shards, shakespeare-gpu on CUDA without them, "
           "shakespeare-cpu elsewhere")
    a("--data", help="a directory of .npy token shards (fineweb.py) or a .txt file (default: edu_fineweb10B/, "
                     "else input.txt)")
    a("--log_dir", default="log", help="log.txt, checkpoints and run metadata go here (default: log)")
    a("--B", type=int, help="micro batch size, sequences per forward pass per process (recipe: 64)")
    a("--T", type=int, help="sequence length (recipe: 1024)")
    a("--total_batch_size", type=int, help="tokens per optimizer step, reached by gradient accumulation (recipe: 524288)")
    a("--max_lr", type=float, help="peak learning rate (recipe: 6e-4)")
    a("--min_lr", type=float, help="final learning rate (default: max_lr/10)")
    a("--warmup_steps", type=int, help="linear warmup steps (recipe: 715)")
    a("--max_steps", type=int, help="optimizer steps (recipe: 19073, one epoch of 10B tokens)")
    a("--weight_decay", type=float, help="AdamW weight decay on >=2-D parameters (recipe: 0.1)")
    a("--n_layer", type=int, help="transformer blocks (recipe: 12)")
    a("--n_head", type=int, help="attention heads (recipe: 12)")
    a("--n_embd", type=int, help="embedding width (recipe: 768)")
    a("--block_size", type=int, help="context length of the model (recipe: 1024)")
    a("--vocab_size", type=int, help="vocabulary, padded to a multiple of 64 for fast kernels (recipe: 50304)")
    a("--eval_interval", type=int, help="steps between val loss / HellaSwag / samples (recipe: 250)")
    a("--val_steps", type=int, help="val batches averaged per evaluation (recipe: 20)")
    a("--checkpoint_interval", type=int, help="steps between checkpoints log/model_XXXXX.pt (recipe: 5000)")
    a("--hellaswag", type=str2bool, help="run the HellaSwag eval every eval_interval steps (recipe: 1)")
    a("--seed", type=int, help="random seed (recipe: 1337)")
    a("--compile", type=str2bool, help="torch.compile the model (default: 1 on CUDA, 0 elsewhere)")
    a("--device", default="auto", help="auto, cuda, cpu or mps (default: auto, CUDA when available)")
    a("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
      help="autocast dtype of the forward pass (default: bfloat16 on CUDA, float32 elsewhere)")
    a("--resume", help="'auto' (the newest checkpoint in log_dir, if any) or a checkpoint path")
    a("--init_from", help="start from weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl, a transformers directory or a "
                          "checkpoint (fine-tuning); the model shape comes from them")
    a("--benchmark", type=int, metavar="N", help="train N steps with no evals, logs or checkpoints, then print a JSON "
                                                 "speed summary")
    a("--sample", metavar="PROMPT", help="sample from --init_from (or --resume) with this prompt instead of training")
    a("--num_samples", type=int, default=4, help="with --sample: sequences to draw (default 4)")
    a("--max_new_tokens", type=int, default=32, help="with --sample: tokens to add to the prompt (default 32)")
    a("--temperature", type=float, default=1.0, help="with --sample: softmax temperature (default 1.0)")
    a("--top_k", type=int, default=50, help="with --sample: sample among the k likeliest tokens (default 50)")
    a("--export_hf", metavar="DIR", help="write --init_from as a transformers GPT2LMHeadModel directory and exit")
    return p


def pick_preset(requested, device_type, data):
    """Which preset fits this machine, and a sentence that says why."""
    if requested != "auto":
        return requested, "asked for with --preset"
    has_shards = data is not None and os.path.isdir(data) and bool(find_shards(data, "train"))
    if device_type == "cuda" and has_shards:
        return "gpt2", f"CUDA and token shards in {data}: the lecture's full recipe"
    if device_type == "cuda":
        return "shakespeare-gpu", f"CUDA but no token shards in {data}"
    return "shakespeare-cpu", f"no CUDA device ({device_type}): a small model that trains in minutes"


def resolve_config(args, device_type, world_size, ckpt_args=None):
    """Recipe < preset < the checkpoint's own values on resume < flags given. Returns (cfg, preset name, why)."""
    data = args.data or (ckpt_args or {}).get("data") or DEFAULT_DATA
    if data != DEFAULT_DATA and not os.path.exists(data):
        raise UsageError(f"--data {data} does not exist; give a directory of shards (python fineweb.py makes "
                         f"edu_fineweb10B/) or a .txt file")
    preset, why = pick_preset(args.preset, device_type, data)
    cfg = dict(RECIPE)
    cfg.update(PRESETS[preset])
    if ckpt_args:
        cfg.update({k: v for k, v in ckpt_args.items() if k in RECIPE})
    cfg.update({k: getattr(args, k) for k in RECIPE if getattr(args, k, None) is not None})
    if args.min_lr is None and not (ckpt_args and ckpt_args.get("min_lr") is not None):
        cfg["min_lr"] = cfg["max_lr"] * 0.1
    cfg["data"], note = resolve_data(data)  # resolved once here, so the loaders below say nothing more
    if note:
        why += "; " + note
    return cfg, preset, why


def check_config(cfg, world_size):
    """Every check that can fail before any work is done, each with the change that fixes it."""
    for k in ("B", "T", "total_batch_size", "max_steps", "n_layer", "n_head", "n_embd", "block_size", "vocab_size",
              "eval_interval", "val_steps", "checkpoint_interval"):
        if cfg[k] <= 0:
            raise UsageError(f"--{k} must be positive, got {cfg[k]}")
    if cfg["warmup_steps"] < 0:
        raise UsageError(f"--warmup_steps must be >= 0, got {cfg['warmup_steps']}")
    if cfg["T"] > cfg["block_size"]:
        raise UsageError(f"--T {cfg['T']} is longer than --block_size {cfg['block_size']}; lower --T or raise --block_size")
    if cfg["n_embd"] % cfg["n_head"] != 0:
        raise UsageError(f"--n_embd {cfg['n_embd']} is not divisible by --n_head {cfg['n_head']}; "
                         f"e.g. --n_embd {cfg['n_head'] * max(1, round(cfg['n_embd'] / cfg['n_head']))}")
    tokens_per_micro = cfg["B"] * cfg["T"] * world_size
    if cfg["total_batch_size"] % tokens_per_micro != 0:
        k = max(1, round(cfg["total_batch_size"] / tokens_per_micro))
        raise UsageError(f"--total_batch_size {cfg['total_batch_size']} is not divisible by B*T*world_size = "
                         f"{cfg['B']}*{cfg['T']}*{world_size} = {tokens_per_micro}; use a multiple of it "
                         f"(e.g. {k * tokens_per_micro}) or change --B/--T")
    if not 0 <= cfg["min_lr"] <= cfg["max_lr"]:
        raise UsageError(f"need 0 <= --min_lr <= --max_lr, got min_lr {cfg['min_lr']} and max_lr {cfg['max_lr']}")
    if cfg["vocab_size"] < 50257:
        raise UsageError(f"--vocab_size {cfg['vocab_size']} is smaller than GPT-2's 50257 tokens")


def pick_device(requested):
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = requested.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but PyTorch sees no CUDA device; use --device cpu (or install a CUDA build)")
    if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError("--device mps but MPS is not available here; use --device cpu")
    if kind not in ("cuda", "cpu", "mps"):
        raise UsageError(f"--device {requested}: expected auto, cuda, cpu or mps")
    return requested


# -----------------------------------------------------------------------------
# Sampling and export: one-off commands on a trained (or OpenAI's) model


def load_model_for_inference(args):
    source = args.init_from or (latest_checkpoint(args.log_dir) if args.resume == "auto" else args.resume)
    if not source:
        raise UsageError("nothing to load: give --init_from gpt2|<transformers dir>|<checkpoint> (or --resume PATH)")
    return GPT.from_pretrained(source), source


def sample_main(args):
    device = pick_device(args.device)
    if args.num_samples <= 0 or args.max_new_tokens <= 0 or args.top_k <= 0 or args.temperature <= 0:
        raise UsageError("--num_samples, --max_new_tokens, --top_k and --temperature must be positive")
    model, source = load_model_for_inference(args)
    model.to(device)
    max_length = len(get_encoding().encode(args.sample) or [EOT]) + args.max_new_tokens
    texts = model.generate_text(args.sample, args.num_samples, max_length, seed=args.seed if args.seed is not None else 42,
                                top_k=args.top_k, temperature=args.temperature, bf16=device.startswith("cuda"))
    print(f"sampling from {source}")
    for i, text in enumerate(texts):
        print(f"sample {i}: {text}")


def export_main(args):
    model, source = load_model_for_inference(args)
    out = os.path.abspath(args.export_hf)
    if os.path.exists(out) and os.listdir(out):
        raise UsageError(f"--export_hf {out} exists and is not empty; give a new directory")
    model_hf = model.to_hf()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=os.path.basename(out) + ".tmp")
    model_hf.save_pretrained(tmp)  # safetensors + config.json
    if os.path.exists(out):
        os.rmdir(out)
    os.replace(tmp, out)
    print(f"exported {source} to {out} (transformers GPT2LMHeadModel: GPT2LMHeadModel.from_pretrained('{out}'))")


# -----------------------------------------------------------------------------
# Training


def train(args):
    # set up DDP (distributed data parallel). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
    ddp = int(os.environ.get("RANK", -1)) != -1
    ddp_rank = int(os.environ.get("RANK", 0))
    ddp_local_rank = int(os.environ.get("LOCAL_RANK", 0))
    ddp_world_size = int(os.environ.get("WORLD_SIZE", 1))
    master_process = ddp_rank == 0  # this process logs, evaluates to the log file and writes checkpoints
    device = pick_device(args.device)
    device_type = device.split(":")[0]
    if device == "cuda":  # set_device needs an index: cuda:0 for one GPU, LOCAL_RANK's under torchrun
        device = f"cuda:{ddp_local_rank}"

    def print0(*a, **kw):
        if master_process:
            print(*a, **kw, flush=True)

    # resolve the configuration before any process group exists, so bad flags fail fast and alike on all ranks
    resume_path = None
    if args.resume:
        resume_path = latest_checkpoint(args.log_dir) if args.resume == "auto" else args.resume
        if args.resume != "auto" and not os.path.isfile(resume_path):
            raise UsageError(f"--resume {resume_path}: no such file; give a checkpoint path or 'auto'")
    ckpt = load_checkpoint(resume_path) if resume_path else None
    if ckpt is not None and args.init_from:
        raise UsageError("--resume and --init_from both given: --resume continues a run, --init_from starts a new one")
    cfg, preset, why = resolve_config(args, device_type, ddp_world_size, ckpt.get("args") if ckpt else None)
    check_config(cfg, ddp_world_size)
    if ddp:
        # nccl between GPUs; gloo lets the same torchrun command run on CPU-only machines
        backend = "nccl" if device_type == "cuda" else "gloo"
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's agent keeps one key-value store for all restarts, so a restarted group (--max-restarts)
            # would read the dead group's addresses from it and fail to connect (pytorch#135712): give every
            # restart attempt keys of its own
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), ddp_world_size,
                                  is_master=False, timeout=datetime.timedelta(minutes=10))
            dist.init_process_group(backend, store=dist.PrefixStore(f"train_gpt2/attempt_{attempt}", store),
                                    rank=ddp_rank, world_size=ddp_world_size)
        else:
            dist.init_process_group(backend)
    if device_type == "cuda":
        torch.cuda.set_device(device)

    B, T = cfg["B"], cfg["T"]
    total_batch_size = cfg["total_batch_size"]
    grad_accum_steps = total_batch_size // (B * T * ddp_world_size)
    bench = args.benchmark
    print0(f"preset: {preset} ({why}); device: {device} x {ddp_world_size}")
    print0(f"total desired batch size: {total_batch_size}")
    print0(f"=> calculated gradient accumulation steps: {grad_accum_steps}")

    torch.manual_seed(cfg["seed"])
    if torch.cuda.is_available():
        torch.cuda.manual_seed(cfg["seed"])

    train_loader = DataLoaderLite(B, T, ddp_rank, ddp_world_size, "train", cfg["data"], master_process)
    val_loader = DataLoaderLite(B, T, ddp_rank, ddp_world_size, "val", cfg["data"], master_process)

    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls that remain outside autocast
    if args.dtype == "auto":
        use_bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported()
    else:
        use_bf16 = args.dtype == "bfloat16"

    # the model: from scratch (vocab padded to 50304: a multiple of 64 makes the kernels faster), or pretrained
    if ckpt is not None:  # resuming: the checkpoint fixes the model's shape, and flags may not contradict it
        config = GPTConfig(**ckpt["config"])
        clash = shape_clash(args, config)
        if clash:
            raise UsageError(f"checkpoint {resume_path} holds a model with " +
                             ", ".join(f"{k}={have}" for k, (have, asked) in clash.items()) + " but the flags ask for " +
                             ", ".join(f"{k}={asked}" for k, (have, asked) in clash.items()) + "; drop those flags to resume")
        model = GPT(config)
        model.load_state_dict(ckpt["model"])
    elif args.init_from:
        model = GPT.from_pretrained(args.init_from)
        clash = shape_clash(args, model.config, skip=("block_size",))  # a smaller block_size crops, below
        if clash:
            raise UsageError(f"--init_from {args.init_from} fixes the model shape; drop the flags {sorted(clash)}")
        if args.block_size is not None and args.block_size < model.config.block_size:
            model.crop_block_size(args.block_size)
        print0(f"initialised from {args.init_from}")
    else:
        model = GPT(GPTConfig(**{k: cfg[k] for k in MODEL_KEYS}))
    config = model.config
    cfg.update({k: getattr(config, k) for k in MODEL_KEYS})  # what was built, for the log and the checkpoint
    if T > config.block_size:
        raise UsageError(f"--T {T} is longer than the model's block size {config.block_size}; lower --T")
    model.to(device)
    raw_model = model  # the plain module: its state_dict has no '_orig_mod.' or 'module.' prefixes
    use_compile = args.compile if args.compile is not None else device_type == "cuda"
    if use_compile:
        model = torch.compile(model)
    eval_model = model  # compiled but not DDP-wrapped: evaluation needs no gradient synchronisation
    if ddp:
        model = DDP(model, device_ids=[ddp_local_rank] if device_type == "cuda" else None)
    print0(f"model: {raw_model.num_params(non_embedding=False):,} parameters, {config}; compile: {use_compile}; "
           f"autocast: {'bfloat16' if use_bf16 else 'off (float32)'}")

    max_lr, min_lr, warmup_steps, max_steps = cfg["max_lr"], cfg["min_lr"], cfg["warmup_steps"], cfg["max_steps"]
    optimizer = raw_model.configure_optimizers(cfg["weight_decay"], max_lr, device_type, verbose=master_process)

    start_step = 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        start_step = ckpt["step"]
        if len(ckpt["train_loader"]) != ddp_world_size:
            raise UsageError(f"checkpoint {resume_path} was written by {len(ckpt['train_loader'])} process(es); "
                             f"resume with the same number (or start anew with --init_from {resume_path})")
        train_loader.load_state_dict(ckpt["train_loader"][ddp_rank])
        set_rng_state(ckpt["rng"][ddp_rank])
        print0(f"resumed from {resume_path} at step {start_step}")
    del ckpt  # the weights now live in the model and optimizer; free the CPU copy

    from_step = start_step
    flops_per_token = raw_model.flops_per_token(T)
    peak = peak_flops(device_type) if use_bf16 else None
    autocast = lambda: torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=use_bf16)

    # the log directory: log.txt in the lecture's format, plus one line of metadata per launch
    log_dir = args.log_dir
    log_file = os.path.join(log_dir, "log.txt")
    if master_process and not bench:
        os.makedirs(log_dir, exist_ok=True)
        old = [f for f in os.listdir(log_dir) if f == "log.txt" or (f.startswith("model_") and f.endswith(".pt"))]
        if old and not args.resume:
            # a new run never overwrites an old one: move the old one aside, whole
            dest = base = os.path.join(log_dir, "previous-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
            n = 1
            while os.path.exists(dest):  # two runs started within a second
                dest, n = f"{base}-{n}", n + 1
            os.makedirs(dest)
            for f in old:
                os.replace(os.path.join(log_dir, f), os.path.join(dest, f))
            print0(f"{log_dir} held an earlier run; moved its log.txt and checkpoints to {dest}")
        meta = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv, "preset": preset,
                "config": cfg, "model": asdict(config), "world_size": ddp_world_size, "device": device,
                "device_name": torch.cuda.get_device_name() if device_type == "cuda" else platform.processor(),
                "torch": torch.__version__, "python": platform.python_version(), "resumed_from": resume_path,
                "start_step": start_step}
        with open(os.path.join(log_dir, "runs.jsonl"), "a") as f:
            f.write(json.dumps(meta) + "\n")
    if ddp:
        dist.barrier()

    def log(line):
        if master_process and not bench:
            with open(log_file, "a") as f:  # appended, never truncated: a resumed run adds to its history
                f.write(line + "\n")

    hellaswag_on = cfg["hellaswag"] and not bench
    val_loss = None
    step_times = []
    last_checkpoint = resume_path
    for step in range(start_step, max_steps + 1):
        last_step = step == max_steps  # after the final update: evaluate and save the finished model
        fresh = step == from_step and resume_path is not None  # these evals were logged before the checkpoint

        # once in a while evaluate our validation loss
        if not bench and not fresh and (step % cfg["eval_interval"] == 0 or last_step):
            eval_model.eval()
            val_loader.reset()
            with torch.no_grad():
                val_loss_accum = torch.zeros((), device=device)
                for _ in range(cfg["val_steps"]):
                    x, y = val_loader.next_batch()
                    x, y = x.to(device), y.to(device)
                    with autocast():
                        logits, loss = eval_model(x, y)
                    val_loss_accum += loss.detach() / cfg["val_steps"]
            if ddp:
                dist.all_reduce(val_loss_accum, op=dist.ReduceOp.SUM)  # gloo has no AVG
                val_loss_accum /= ddp_world_size
            val_loss = val_loss_accum.item()
            print0(f"validation loss: {val_loss:.4f}")
            log(f"{step} val {val_loss:.4f}")

            # HellaSwag: examples split across ranks, counts summed
            if hellaswag_on:
                import hellaswag
                try:
                    num_correct_norm, num_correct, num_total = hellaswag.evaluate(
                        eval_model, device=device, rank=ddp_rank, world_size=ddp_world_size,
                        autocast_dtype=torch.bfloat16 if use_bf16 else None)
                    acc_norm = num_correct_norm / num_total
                    print0(f"HellaSwag accuracy: {num_correct_norm}/{num_total}={acc_norm:.4f}")
                    log(f"{step} hella {acc_norm:.4f}")
                except hellaswag.HellaSwagUnavailable as e:
                    print0(f"warning: HellaSwag is unavailable, training goes on without it ({e})")
                    hellaswag_on = False

            # a few samples from the model, to see it learn to write (eager: see GPT.generate)
            if step > 0:
                samples = raw_model.generate_text("Hello, I'm a language model,", 4, 32, seed=42 + ddp_rank, bf16=use_bf16)
                for i, text in enumerate(samples):
                    print(f"rank {ddp_rank} sample {i}: {text}", flush=True)

        # checkpoints: everything a resumed run needs to continue exactly as if never stopped
        if not bench and not fresh and step > 0 and (step % cfg["checkpoint_interval"] == 0 or last_step):
            loader_states = [train_loader.state_dict()]
            rng_states = [rng_state()]
            if ddp:  # every rank's reading position and RNG
                loader_states = [None] * ddp_world_size
                rng_states = [None] * ddp_world_size
                dist.all_gather_object(loader_states, train_loader.state_dict())
                dist.all_gather_object(rng_states, rng_state())
            if master_process:
                checkpoint = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                              "config": asdict(config), "step": step, "val_loss": val_loss,
                              "args": {k: v for k, v in cfg.items()}, "train_loader": loader_states, "rng": rng_states}
                last_checkpoint = os.path.join(log_dir, f"model_{step:05d}.pt")
                save_atomic(checkpoint, last_checkpoint)
                print0(f"saved checkpoint {last_checkpoint}")
            if ddp:
                dist.barrier()
        if last_step:
            break

        # one optimization step: grad_accum_steps micro batches of B*T tokens on each process
        t0 = time.time()
        model.train()
        optimizer.zero_grad()
        loss_accum = torch.zeros((), device=device)
        for micro_step in range(grad_accum_steps):
            x, y = train_loader.next_batch()
            x, y = x.to(device), y.to(device)
            if ddp:
                # all-reduce the gradients only after the last micro step; DDP reads this in forward() too
                model.require_backward_grad_sync = (micro_step == grad_accum_steps - 1)
            with autocast():
                logits, loss = model(x, y)
            # the gradients of the micro steps add up, so scale each loss to make the sum a mean
            loss = loss / grad_accum_steps
            loss_accum += loss.detach()  # stays on the device: no host synchronisation inside the loop
            loss.backward()
        if ddp:
            dist.all_reduce(loss_accum, op=dist.ReduceOp.SUM)  # the logged loss is the mean over all ranks
            loss_accum /= ddp_world_size
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        lr = get_lr(step, max_lr, min_lr, warmup_steps, max_steps)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        optimizer.step()
        if device_type == "cuda":
            torch.cuda.synchronize()  # wait for the GPU, so the time below is the step's real time
        dt = time.time() - t0
        loss_value, norm = torch.stack([loss_accum, norm.float()]).tolist()  # one copy to the host
        if not (math.isfinite(loss_value) and math.isfinite(norm)):
            # the update just taken may have broken the weights, so stop before anything saves them
            what = f"the loss is {loss_value}" if not math.isfinite(loss_value) else f"the gradient norm is {norm}"
            raise UsageError(f"step {step}: {what}; stopping. The last good checkpoint is "
                             f"{last_checkpoint or 'none yet'}; lower --max_lr or check the data, then --resume it")
        tokens_per_sec = total_batch_size / dt
        step_times.append(dt)
        mfu = flops_per_token * tokens_per_sec / (peak * ddp_world_size) if peak else None
        print0(f"step {step:5d} | loss: {loss_value:.6f} | lr {lr:.4e} | norm: {norm:.4f} | dt: {dt * 1000:.2f}ms | "
               f"tok/sec: {tokens_per_sec:.2f} | mfu: {f'{100 * mfu:.2f}%' if mfu else 'n/a'}")
        log(f"{step} train {loss_value:.6f}")
        if bench and step + 1 - start_step >= bench:
            break

    if bench:
        warm = step_times[min(len(step_times) - 1, max(1, len(step_times) // 5)):]  # drop compile / warm-up steps
        ms = 1000 * float(np.median(warm))
        summary = {"device": torch.cuda.get_device_name() if device_type == "cuda" else f"{device_type} ({platform.processor() or platform.machine()})",
                   "world_size": ddp_world_size, "torch": torch.__version__, "B": B, "T": T,
                   "grad_accum_steps": grad_accum_steps, "total_batch_size": total_batch_size, "compile": use_compile,
                   "dtype": "bfloat16" if use_bf16 else "float32", "steps_timed": len(warm),
                   "median_ms_per_step": round(ms, 2), "tok_per_sec": round(total_batch_size / ms * 1000, 1),
                   "mfu": round(flops_per_token * total_batch_size / (ms / 1000) / (peak * ddp_world_size), 4) if peak else None,
                   "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device_type == "cuda" else None}
        print0(json.dumps(summary))
    if ddp:
        dist.destroy_process_group()


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.sample is not None:
            sample_main(args)
        elif args.export_hf:
            export_main(args)
        else:
            train(args)
    except UsageError as e:
        # one line that names the problem and the fix; with torchrun every rank would say the same, so rank 0 does
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"train_gpt2.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
