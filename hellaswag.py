"""
HellaSwag: pick the right one of four endings for a context, as the "Let's reproduce GPT-2" lecture scores it.

    python hellaswag.py -m gpt2 -d cuda                  # OpenAI's GPT-2 (124M) on the 10042 val examples
    python hellaswag.py -m log/model_19072.pt           # one of train_gpt2.py's checkpoints
    python hellaswag.py -m path/to/transformers/dir     # a directory written by save_pretrained
    python hellaswag.py --benchmark -m random:n_layer=4,n_head=4,n_embd=256 -d cpu --synthetic 200

Scoring (the lecture's): each ending is appended to the context as " " + ending, the model's cross entropy is
taken over the ending's tokens only, and the prediction is the ending with the lowest mean loss (acc_norm) or
the lowest summed loss (acc). Unlike the lecture, many examples go through the model in one forward pass: the
rows are padded on the right to a common length, and the mask keeps the padding out of the loss. Padding on the
right cannot change a causal model's outputs at the real positions, so the predictions are the same as one
example at a time.

Data: hellaswag/hellaswag_{split}.jsonl next to this file. When it is missing it is downloaded from the
original GitHub repository, and failing that built from the Hugging Face copy (Rowan/hellaswag, via the
`datasets` package). Environment variables override the places:
    HELLASWAG_DIR         the data directory (default: hellaswag/ next to this file)
    HELLASWAG_URL         the download URL, with {split} for train/val/test (default: the GitHub raw URL)
    HELLASWAG_HF_DATASET  the Hugging Face dataset, or a local directory datasets.load_dataset can read
                          (default: Rowan/hellaswag)

train_gpt2.py calls evaluate() every eval_interval steps, with the examples split across its ranks.
"""

import argparse
import json
import math
import os
import socket
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import torch
import torch.distributed as dist
from torch.nn import functional as F
from tqdm import tqdm

from gpt2_tokenizer import get_encoding

HERE = os.path.dirname(os.path.abspath(__file__))
SPLITS = ("train", "val", "test")
DEFAULT_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
DEFAULT_HF_DATASET = "Rowan/hellaswag"
HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}
DOWNLOAD_TIMEOUT = 15  # seconds without a byte before a download is given up
BUCKET = 64  # compiled forward passes see lengths that are multiples of this (see _batches)


class HellaSwagUnavailable(Exception):
    """The HellaSwag data is not here and could not be fetched (or is unusable). train_gpt2.py catches this,
    warns once and trains on without HellaSwag; the CLI prints it as a one-line error."""


class HellaSwagDataError(HellaSwagUnavailable):
    """A line of the JSONL file is not a HellaSwag example; the message names the file and the line."""


# -----------------------------------------------------------------------------
# The data: find it, fetch it, read it


def data_dir(path=None):
    return path or os.environ.get("HELLASWAG_DIR") or os.path.join(HERE, "hellaswag")


def data_path(split="val", directory=None):
    return os.path.join(data_dir(directory), f"hellaswag_{split}.jsonl")


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _reason(e):
    """An exception as a short one-line reason for an error message."""
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:160]}"


def _parse_line(line, where, need_label=True):
    """One JSONL line as an example dict; HellaSwagDataError (naming `where`, e.g. 'file line 17') if it is not one."""
    try:
        ex = json.loads(line)
    except json.JSONDecodeError as e:
        raise HellaSwagDataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(ex, dict):
        raise HellaSwagDataError(f"{where}: expected a JSON object, got {type(ex).__name__}")
    if not isinstance(ex.get("ctx"), str):
        raise HellaSwagDataError(f"{where}: 'ctx' must be a string")
    endings = ex.get("endings")
    if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)):
        raise HellaSwagDataError(f"{where}: 'endings' must be a list of 4 strings")
    label = ex.get("label")
    if isinstance(label, str) and label.strip().isdigit():  # tolerate "2" for 2
        ex["label"] = label = int(label)
    if need_label or label is not None:
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < 4:
            raise HellaSwagDataError(f"{where}: 'label' must be an integer 0-3, got {label!r}"
                                     + (" (the test split has no labels)" if label is None else ""))
    return ex


def read_examples(path, need_label=True):
    """All examples of a HellaSwag JSONL file, in file order. Blank lines are skipped; any other line that is
    not an example raises HellaSwagDataError with its line number."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                examples.append(_parse_line(line, f"{path} line {lineno}", need_label))
    if not examples:
        raise HellaSwagDataError(f"{path}: no examples in the file")
    return examples


def _tmp_beside(dest):
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=os.path.basename(dest) + ".", suffix=".tmp")
    return fd, tmp


def _download_url(url, dest, progress=True, timeout=DOWNLOAD_TIMEOUT):
    """Stream url to dest with a progress bar; only a complete file of valid examples lands under dest."""
    fd, tmp = _tmp_beside(dest)
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "hellaswag.py"})
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(req, timeout=timeout) as r:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="iB", unit_scale=True, unit_divisor=1024, desc=f"downloading {url}",
                      disable=not progress) as bar:
                while True:
                    chunk = r.read(1 << 16)
                    if not chunk:
                        break
                    f.write(chunk)
                    bar.update(len(chunk))
        # a proxy's error page or a cut-off transfer must not become the cached data set
        read_examples(tmp, need_label=False)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _hub_unreachable(timeout=5):
    """Why the Hugging Face hub cannot be reached, or None when it can (or when we cannot tell). datasets retries
    an unreachable hub for about 25 s; one TCP connection answers the same question at once."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return None  # offline mode: datasets reads its own cache, without the network
    if urllib.request.getproxies():
        return None  # through a proxy a direct connection proves nothing
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError as e:
        return f"cannot connect to {endpoint.hostname}:{port} ({_reason(e)})"
    return None


def _download_hf(name, split, dest, progress=True):
    """Write the Hugging Face copy of a split as the original JSONL (its label is a string there: "" on test)."""
    if not os.path.exists(name):
        why = _hub_unreachable()
        if why:
            raise ConnectionError(why)
    import datasets  # only here: importing it costs a second and most runs never need it
    ds = datasets.load_dataset(name, split=HF_SPLITS[split])
    fd, tmp = _tmp_beside(dest)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for i, row in enumerate(tqdm(ds, desc=f"writing {os.path.basename(dest)}", disable=not progress)):
                row = dict(row)
                label = row.pop("label", None)
                if label is not None and str(label).strip() != "":
                    row["label"] = int(label)
                # the same checks as a downloaded file, so a foreign data set fails here and not mid-eval
                _parse_line(json.dumps(row), f"{name} row {i}", need_label=False)
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def download(split="val", directory=None, url=None, hf_dataset=None, progress=True):
    """Make sure hellaswag_{split}.jsonl is in the data directory and return its path: from GitHub, else from the
    Hugging Face hub. Raises HellaSwagUnavailable when neither works."""
    _check_split(split)
    dest = data_path(split, directory)
    if os.path.exists(dest):
        return dest
    url = (url or os.environ.get("HELLASWAG_URL") or DEFAULT_URL).format(split=split)
    hf_dataset = hf_dataset or os.environ.get("HELLASWAG_HF_DATASET") or DEFAULT_HF_DATASET
    try:
        _download_url(url, dest, progress)
        return dest
    except Exception as e:  # network errors, HTTP errors, a file that is not HellaSwag: try the next source
        github_error = f"{url}: {_reason(e)}"
    try:
        _download_hf(hf_dataset, split, dest, progress)
        return dest
    except Exception as e:
        hf_error = _reason(e)
    raise HellaSwagUnavailable(
        f"could not get hellaswag_{split}.jsonl from GitHub ({github_error}) nor {hf_dataset} on the Hugging Face "
        f"hub ({hf_error}); put the file at {dest}")


_RENDERED = {}  # (path, size, mtime) -> rendered examples: each evaluation during training re-reads nothing


def load_examples(split="val", directory=None, fetch=True, progress=True):
    """The split's examples as (ctx_tokens, [4 ending token lists], label), fetching the file if allowed."""
    _check_split(split)
    path = download(split, directory, progress=progress) if fetch else data_path(split, directory)
    if not os.path.exists(path):
        raise HellaSwagUnavailable(f"no file {path}")
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _RENDERED:
        _RENDERED.clear()
        _RENDERED[key] = [tokenize_example(ex) for ex in read_examples(path)]
    return _RENDERED[key]


# -----------------------------------------------------------------------------
# Rendering: the lecture's layout


def tokenize_example(example):
    """(ctx_tokens, [end_tokens] * 4, label): the context, and each ending with its leading space, as GPT-2 tokens."""
    enc = get_encoding()
    ctx_tokens = enc.encode(example["ctx"])
    return ctx_tokens, [enc.encode(" " + end) for end in example["endings"]], example.get("label")


def render_example(example):
    """The lecture's render_example: (data, tokens (4, L), mask (4, L), label). Row i is the context then ending
    i; mask is 1 on the ending's tokens; rows are padded on the right with token 0 and mask 0."""
    tokenized = tokenize_example(example)
    ctx_tokens, ending_tokens, label = tokenized
    data = {"label": label, "ctx_tokens": ctx_tokens, "ending_tokens": ending_tokens}
    tokens, mask = _padded(_rows(tokenized))
    return data, tokens, mask, label


def _padded(rows, n_rows=None, length=None):
    """(tokens, mask) rows as two (n_rows, length) long tensors, padded on the right with zeros."""
    n_rows = n_rows or len(rows)
    length = length or max(len(t) for t, _ in rows)
    tokens = torch.zeros((n_rows, length), dtype=torch.long)
    mask = torch.zeros((n_rows, length), dtype=torch.long)
    for i, (t, m) in enumerate(rows):
        tokens[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        mask[i, :len(m)] = torch.tensor(m, dtype=torch.long)
    return tokens, mask


def _rows(tokenized, max_len=None):
    """The 4 (tokens, mask) rows of an example. A row longer than the model's context (max_len) loses tokens at
    its start, so the ending is always scored whole; GPT-2's 1024 is never reached by HellaSwag."""
    ctx_tokens, ending_tokens, _ = tokenized
    rows = []
    for end in ending_tokens:
        toks, mask = ctx_tokens + end, [0] * len(ctx_tokens) + [1] * len(end)
        if max_len is not None and len(toks) > max_len:
            toks, mask = toks[-max_len:], mask[-max_len:]
        rows.append((toks, mask))
    return rows


def _example_len(tokenized, max_len=None):
    n = len(tokenized[0]) + max(len(e) for e in tokenized[1])
    return min(n, max_len) if max_len else n


# -----------------------------------------------------------------------------
# Scoring


def _unwrap(model):
    """The plain module under torch.compile's OptimizedModule and DDP wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _is_compiled(model):
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return isinstance(getattr(model, "_orig_mod", None), torch.nn.Module)


def _max_len(raw):
    """The model's context length: our GPT's block_size, or a transformers GPT-2's n_positions."""
    config = getattr(raw, "config", None)
    return getattr(config, "block_size", None) or getattr(config, "n_positions", None)


def _logits(model, tokens):
    out = model(tokens)
    return out[0] if isinstance(out, (tuple, list)) else out.logits  # our GPT, or a transformers model


def _row_losses_fixed(model, tokens, mask):
    """Summed ending loss and ending length of each row, for the compiled path: whole-tensor ops only (no
    data-dependent shapes), so the forward pass and the float32 cross entropy compile into one graph."""
    logits = _logits(model, tokens)[:, :-1, :].float()
    targets, m = tokens[:, 1:], mask[:, 1:].float()
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return (losses.view_as(m) * m).sum(1), m.sum(1)


def _row_losses_eager(model, tokens, mask):
    """The same as _row_losses_fixed, but the float32 cross entropy is taken at the ending positions only (a third
    of the positions or fewer), which saves memory and time when nothing is compiled."""
    logits = _logits(model, tokens)[:, :-1, :]
    sel = mask[:, 1:].bool()
    losses = F.cross_entropy(logits[sel].float(), tokens[:, 1:][sel], reduction="none")
    row = torch.arange(tokens.size(0), device=tokens.device).unsqueeze(1).expand_as(sel)[sel]
    sums = torch.zeros(tokens.size(0), device=tokens.device, dtype=torch.float32).index_add_(0, row, losses)
    return sums, sel.sum(1).float()


_COMPILED = {}


def _compiled_row_losses(backend):
    # Why this is compile-proof. The lecture had to turn torch.compile off: the compiled model met a new shape
    # with every HellaSwag example (and every generated token) and recompiled. Here:
    #  1. Shapes are bucketed: every forward pass has the same number of rows (4 * batch_size; the last batch is
    #     padded with empty rows) and a length rounded up to a multiple of BUCKET (64). HellaSwag rows are short
    #     (tens to a couple of hundred tokens), so an evaluation compiles one graph per bucket, a handful, once per
    #     run; later evaluations reuse them. dynamic=False keeps each graph static (the fastest kernels) instead
    #     of letting dynamo switch to symbolic shapes. (Past dynamo's recompile limit, 8 by default, a shape
    #     would run eagerly: still correct, and not reached by HellaSwag.)
    #  2. We compile our own function (model call + float32 cross entropy in one graph) rather than calling the
    #     training's compiled module. Dynamo's automatic dynamic shapes keep their memory per code object: had
    #     the eval's new shapes gone through the training module, its next recompile (e.g. back to train mode)
    #     would make the *training* graph dynamic. This function is a separate code object, so the training
    #     graph never sees the eval's shapes (tests/test_hellaswag.py checks both).
    # The sampler in train_gpt2.py runs eagerly (GPT.generate), so generation never touches these caches.
    key = backend if isinstance(backend, str) else id(backend)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_row_losses_fixed, backend=backend, dynamic=False)
    return _COMPILED[key]


def _batches(items, batch_size, max_len, fixed_shapes):
    """Group (index, tokenized) items into padded (idx list, tokens, mask) batches of up to batch_size examples.
    Longest first, so each batch holds examples of similar length (little padding) and the largest batch, the
    one that needs the most memory, comes first. With fixed_shapes every batch is (4 * batch_size, L) with L a
    multiple of BUCKET (capped at max_len); otherwise each batch is as long as its longest row."""
    items = sorted(items, key=lambda it: -_example_len(it[1], max_len))
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        rows = [r for _, ex in chunk for r in _rows(ex, max_len)]
        L = max(len(t) for t, _ in rows)
        n_rows = len(rows)
        if fixed_shapes:
            L = BUCKET * math.ceil(L / BUCKET)
            L = min(L, max_len) if max_len else L
            n_rows = 4 * batch_size
        tokens, mask = _padded(rows, n_rows, L)
        yield [i for i, _ in chunk], tokens, mask


def _autocast(device, dtype):
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


def score(model, examples, device, batch_size=8, autocast_dtype=None, compile=None, progress=False,
          compile_backend="inductor"):
    """Batched scoring of tokenized examples (from tokenize_example / load_examples). Returns (sum_losses,
    mean_losses), float32 CPU tensors of shape (N, 4), in the order of `examples`. compile=None compiles (with
    compile_backend) exactly when `model` is a torch.compile'd module; see _compiled_row_losses."""
    if not examples:
        return torch.zeros((0, 4)), torch.zeros((0, 4))
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    raw = _unwrap(model)
    max_len = _max_len(raw)
    use_compile = _is_compiled(model) if compile is None else compile
    row_losses = _compiled_row_losses(compile_backend) if use_compile else _row_losses_eager
    sums = torch.zeros((len(examples), 4))
    counts = torch.zeros((len(examples), 4))
    was_training = raw.training
    raw.eval()
    try:
        with torch.no_grad(), tqdm(total=len(examples), desc="hellaswag", unit="ex", disable=not progress) as bar:
            for idx, tokens, mask in _batches(list(enumerate(examples)), batch_size, max_len, use_compile):
                with _autocast(device, autocast_dtype):
                    s, n = row_losses(raw, tokens.to(device), mask.to(device))
                k = 4 * len(idx)
                sums[idx] = s[:k].float().cpu().view(-1, 4)
                counts[idx] = n[:k].float().cpu().view(-1, 4)
                bar.update(len(idx))
    finally:
        raw.train(was_training)
    return sums, sums / counts


def score_one_by_one(model, examples, device, autocast_dtype=None, progress=False):
    """The lecture's loop: one example (4 rows) per forward pass, loss over all positions then masked. The
    baseline for the benchmark and the reference for the tests. Same return value as score()."""
    raw = _unwrap(model)
    max_len = _max_len(raw)
    sums, means = torch.zeros((len(examples), 4)), torch.zeros((len(examples), 4))
    with torch.no_grad():
        for i, ex in enumerate(tqdm(examples, desc="hellaswag (one by one)", disable=not progress)):
            tokens, mask = _padded(_rows(ex, max_len))  # render_example's layout
            tokens, mask = tokens.to(device), mask.to(device)
            with _autocast(device, autocast_dtype):
                logits = _logits(raw, tokens)
            # the lecture's computation: cross entropy at every position, then keep the ending's
            shift_logits = logits[..., :-1, :].contiguous().float()
            shift_tokens = tokens[..., 1:].contiguous()
            shift_losses = F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_tokens.view(-1),
                                           reduction="none").view(tokens.size(0), -1)
            shift_mask = mask[..., 1:].contiguous()
            masked = shift_losses * shift_mask
            sums[i] = masked.sum(dim=1).cpu()
            means[i] = (masked.sum(dim=1) / shift_mask.sum(dim=1)).cpu()
    return sums, means


def count_correct(sum_losses, mean_losses, labels):
    """(num_correct_norm, num_correct): predictions by lowest mean loss and by lowest summed loss."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    num_correct_norm = int((mean_losses.argmin(dim=1) == labels).sum())
    num_correct = int((sum_losses.argmin(dim=1) == labels).sum())
    return num_correct_norm, num_correct


def _agree(error, device, world_size):
    """Collective: raise on every rank if any rank failed, so no rank is left waiting in a later all_reduce."""
    if world_size > 1:
        flag = torch.tensor([0 if error is None else 1], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.SUM)
        if flag.item() and error is None:
            error = HellaSwagUnavailable("another rank could not read the HellaSwag data")
    if error is not None:
        raise error


def _load_on_ranks(split, directory, rank, world_size, device, progress):
    if world_size == 1:
        return load_examples(split, directory, progress=progress)
    # rank 0 fetches the file once while the others wait; then every rank reads it (a rank on another machine
    # without a shared disk fetches its own copy)
    error = None
    if rank == 0:
        try:
            download(split, directory, progress=progress)
        except HellaSwagUnavailable as e:
            error = e
    _agree(error, device, world_size)
    examples = None
    try:
        examples = load_examples(split, directory, progress=False)
    except HellaSwagUnavailable as e:
        error = e
    _agree(error, device, world_size)
    return examples


def evaluate(model, device, rank=0, world_size=1, autocast_dtype=None, split="val", batch_size=None, limit=None,
             data_dir=None, compile=None, compile_backend="inductor", progress=False):
    """HellaSwag accuracy of `model` on the split: (num_correct_norm, num_correct, num_total), summed over all
    ranks. Example i is scored by rank i % world_size; with world_size > 1 the process group must be up (every
    rank must call this). `model` may be our GPT, torch.compile'd or not, or a transformers GPT2LMHeadModel.
    batch_size: examples per forward pass (default 32 on CUDA, 8 elsewhere); limit: the first N examples only;
    compile: None compiles the scoring (with compile_backend) exactly when `model` is torch.compile'd.
    Raises HellaSwagUnavailable (on every rank) when the data is missing and cannot be fetched."""
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"world_size={world_size} needs an initialised torch.distributed process group")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    examples = _load_on_ranks(split, data_dir, rank, world_size, device, progress and rank == 0)
    if limit is not None:
        examples = examples[:limit]
    mine = examples[rank::world_size]
    if batch_size is None:
        batch_size = 32 if torch.device(device).type == "cuda" else 8
    # no more rows per forward than the largest share needs: a small --limit is not padded up to a full batch
    batch_size = max(1, min(batch_size, math.ceil(len(examples) / world_size)))
    sums, means = score(model, mine, device, batch_size, autocast_dtype, compile, progress and rank == 0,
                        compile_backend)
    num_correct_norm, num_correct = count_correct(sums, means, [ex[2] for ex in mine])
    counts = torch.tensor([num_correct_norm, num_correct, len(mine)], dtype=torch.long, device=device)
    if world_size > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)  # gloo has no AVG; counts add up anyway
    num_correct_norm, num_correct, num_total = (int(c) for c in counts.tolist())
    return num_correct_norm, num_correct, num_total


# -----------------------------------------------------------------------------
# Command line: evaluate a model, or benchmark the batched path against the lecture's loop

WORDS = ("the man woman person is then a to and of in with on his her he she they it puts takes uses starts "
         "continues begins shows camera water ball floor table hand hands hair car dog kitchen knife bowl field "
         "player team game rope bike slowly quickly again back into over around after while next up down out "
         "small large red blue other first several two people standing sitting walking running talking").split()


def synthetic_examples(n, seed=0):
    """n examples with HellaSwag-like lengths (contexts of 40-80 tokens, endings of 20-40), random words: for a
    benchmark where the real data cannot be had."""
    import random
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))
    return [{"ctx": words(rng.randint(40, 80)).capitalize() + ".",
             "endings": [words(rng.randint(20, 40)) + "." for _ in range(4)], "label": rng.randrange(4)}
            for _ in range(n)]


def _load_model(spec):
    """Our GPT from a name, a transformers directory, a checkpoint, or random:key=value,... (random weights)."""
    import train_gpt2  # here and not at the top: train_gpt2 imports this module inside its training loop
    if spec == "random" or spec.startswith("random:"):
        kwargs = {"vocab_size": 50304}
        for item in filter(None, spec[len("random:"):].split(",")):
            key, _, value = item.partition("=")
            if key not in train_gpt2.GPTConfig.__dataclass_fields__ or not value.isdigit():
                raise train_gpt2.UsageError(f"-m {spec}: expected random:key=value,... with integer values for "
                                            f"{', '.join(train_gpt2.GPTConfig.__dataclass_fields__)}")
            kwargs[key] = int(value)
        torch.manual_seed(0)
        return train_gpt2.GPT(train_gpt2.GPTConfig(**kwargs))
    return train_gpt2.GPT.from_pretrained(spec)


def build_parser():
    p = argparse.ArgumentParser(description="HellaSwag accuracy of a GPT-2 model, scored as in 'Let's reproduce GPT-2'")
    p.add_argument("-m", "--model_type", default="gpt2",
                   help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, a transformers directory, a log/model_*.pt "
                        "checkpoint, or random:n_layer=4,n_head=4,n_embd=256 (random weights, for benchmarks)")
    p.add_argument("-d", "--device", default="auto", help="auto, cuda, cpu or mps (default: auto)")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--limit", type=int, help="evaluate the first N examples only")
    p.add_argument("--batch_size", type=int, help="examples per forward pass (default: 32 on CUDA, 8 elsewhere)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="autocast dtype (default: bfloat16 on CUDA, float32 elsewhere)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (bucketed shapes: a few graphs)")
    p.add_argument("--data_dir", help="where hellaswag_{split}.jsonl lives (default: $HELLASWAG_DIR or hellaswag/)")
    p.add_argument("--benchmark", action="store_true",
                   help="time the lecture's one-example-per-forward loop against the batched path on the same "
                        "examples and device, and check that they agree")
    p.add_argument("--synthetic", type=int, metavar="N",
                   help="use N random examples with HellaSwag-like lengths instead of the data (for --benchmark)")
    return p


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def benchmark(model, examples, device, batch_size, autocast_dtype, compile):
    labels = [ex[2] for ex in examples]
    # warm-up, untimed: one example for the loop; for the batched path one batch per length bucket, which is
    # every graph torch.compile will build
    score_one_by_one(model, examples[:1], device, autocast_dtype)
    raw = _unwrap(model)
    max_len = _max_len(raw)
    by_bucket = {}
    for ex in examples:
        by_bucket.setdefault(math.ceil(_example_len(ex, max_len) / BUCKET), ex)
    for ex in by_bucket.values():
        score(model, [ex], device, batch_size, autocast_dtype, compile)
    _sync(device)
    t0 = time.perf_counter()
    s1, m1 = score_one_by_one(model, examples, device, autocast_dtype, progress=True)
    _sync(device)
    t1 = time.perf_counter()
    s2, m2 = score(model, examples, device, batch_size, autocast_dtype, compile, progress=True)
    _sync(device)
    t2 = time.perf_counter()
    n = len(examples)
    agree_norm = int((m1.argmin(1) == m2.argmin(1)).sum())
    agree = int((s1.argmin(1) == s2.argmin(1)).sum())
    print(f"one example per forward (the lecture's loop): {n / (t1 - t0):.1f} examples/s ({t1 - t0:.2f} s)")
    print(f"batched ({batch_size} examples per forward{', compiled' if compile else ''}): "
          f"{n / (t2 - t1):.1f} examples/s ({t2 - t1:.2f} s)")
    print(f"speed-up: {(t1 - t0) / (t2 - t1):.1f}x; predictions agree: acc_norm {agree_norm}/{n}, acc {agree}/{n}; "
          f"largest loss difference {float((m1 - m2).abs().max()):.2e}")
    if compile:
        from torch._dynamo.utils import counters
        print(f"torch.compile graphs built: {counters['stats']['unique_graphs']} (length buckets: {len(by_bucket)})")
    return s2, m2, labels


def main(argv=None):
    args = build_parser().parse_args(argv)
    import train_gpt2
    try:
        for name in ("limit", "batch_size", "synthetic"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise train_gpt2.UsageError(f"--{name} must be positive, got {getattr(args, name)}")
        device = train_gpt2.pick_device(args.device)
        device_type = torch.device(device).type
        if args.dtype == "auto":
            autocast_dtype = torch.bfloat16 if device_type == "cuda" else None
        else:
            autocast_dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
        if device_type == "cuda":
            torch.set_float32_matmul_precision("high")
        # the data before the model: a missing file is found out in a second, not after loading GPT-2 XL
        if args.synthetic:
            examples = [tokenize_example(ex) for ex in synthetic_examples(args.synthetic)]
        else:
            examples = load_examples(args.split, args.data_dir, progress=True)
        examples = examples[:args.limit] if args.limit else examples
        model = _load_model(args.model_type).to(device)
        if args.compile:
            model = torch.compile(model)
        batch_size = args.batch_size or (32 if device_type == "cuda" else 8)
        batch_size = min(batch_size, len(examples))
        if args.benchmark:
            print(f"benchmark: {len(examples)} {'synthetic ' if args.synthetic else ''}examples, model "
                  f"{args.model_type} ({_unwrap(model).num_params(non_embedding=False) / 1e6:.1f}M parameters), "
                  f"device {device} ({torch.cuda.get_device_name() if device_type == 'cuda' else 'CPU'}, "
                  f"{torch.get_num_threads()} threads), autocast {autocast_dtype or 'off (float32)'}")
            sums, means, labels = benchmark(model, examples, device, batch_size, autocast_dtype, args.compile)
        else:
            sums, means = score(model, examples, device, batch_size, autocast_dtype, args.compile, progress=True)
            labels = [ex[2] for ex in examples]
    except (HellaSwagUnavailable, train_gpt2.UsageError) as e:
        print(f"hellaswag: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    num_correct_norm, num_correct = count_correct(sums, means, labels)
    n = len(examples)
    print(f"{n} acc: {num_correct / n:.4f} acc_norm: {num_correct_norm / n:.4f}")


if __name__ == "__main__":
    main()
