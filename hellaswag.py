"""
HellaSwag, scored as in "Let's reproduce GPT-2 (124M)": each of the 4 endings is appended to the context
(" " + ending), the model's loss is taken over the ending's tokens only, and the prediction is the ending with the
lowest mean loss (acc_norm) or the lowest summed loss (acc).

    python hellaswag.py -m gpt2 -d cuda      # OpenAI's GPT-2 (124M) on the 10,042 val examples: acc_norm 0.2955
    python hellaswag.py -m DIR               # any GPT-2 directory written by save_pretrained (or --export_hf)
    python train_gpt2.py --eval_only --hellaswag 1 --init_from log/model_19073.pt   # a checkpoint (see there)

train_gpt2.py calls evaluate() with its model every eval_interval steps. Beyond the lecture: many examples per
forward pass (rows padded on the right, which cannot change a causal model's outputs at the real positions),
examples split across DDP ranks, a fixed set of shapes under torch.compile, and a download that is checked
before use, with the Hugging Face copy as a fallback. The data lives in hellaswag/ next to this file, or in
$HELLASWAG_DIR.
"""

import argparse
import hashlib
import json
import math
import os
import socket
import sys
import urllib.parse
import urllib.request

import torch
import torch.distributed as dist
from torch.nn import functional as F
from tqdm import tqdm

from gpt2_tokenizer import atomic_write, get_encoding, reason

DATA_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
HF_DATASET = "Rowan/hellaswag"  # the Hugging Face copy: split "validation", label a string
# what the lecture's download of the val split must be: its git blob id (sha1 of b"blob <size>\0" + the bytes)
# and its number of examples, so that a cut-off or altered download is fetched again, never parsed
VAL_BLOB_ID = "0f5ee25d72216f12317d5d8a7b92deafa423d81e"
VAL_EXAMPLES = 10042
BUCKET = 64  # compiled evaluations see input lengths that are multiples of this: a few graphs, built once


class HellaSwagUnavailable(Exception):
    """The data is missing and cannot be fetched, or a line of it is not a HellaSwag example. Training warns
    once and goes on without HellaSwag; the command line prints it as a one-line error."""


def data_path(split):
    data_dir = os.environ.get("HELLASWAG_DIR") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag")
    return os.path.join(data_dir, f"hellaswag_{split}.jsonl")


def hub_unreachable(timeout=5):
    """Why the Hugging Face hub cannot be reached, or None. Libraries retry an unreachable hub for half a minute;
    one TCP connection answers at once. (HF_HUB_OFFLINE, or a proxy: None, and the libraries decide.)"""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on") or urllib.request.getproxies():
        return None
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
        socket.create_connection((url.hostname, port), timeout).close()
    except OSError as e:
        return f"cannot connect to {url.hostname} ({e})"
    return None


def parse_examples(lines, where):
    """HellaSwag examples from JSON lines (bytes); a line that is not one raises HellaSwagUnavailable naming it."""
    examples = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
            ex["label"] = int(ex["label"])  # (the Hugging Face copy has it as a string)
            assert isinstance(ex["ctx"], str) and len(ex["endings"]) == 4 and 0 <= ex["label"] < 4
            assert all(isinstance(ending, str) for ending in ex["endings"])
        except (ValueError, TypeError, KeyError, AssertionError) as e:  # not JSON or not UTF-8, a missing field
            raise HellaSwagUnavailable(f"{where} line {lineno} is not a HellaSwag example ({reason(e)}); fix or "
                                       f"delete the file") from None
        examples.append(ex)
    if not examples:
        raise HellaSwagUnavailable(f"{where} holds no examples; delete it")
    return examples


def download(split):
    """hellaswag_{split}.jsonl from the lecture's URL (tried twice), checked before it is kept; else the Hugging
    Face copy. Returns its path; raises HellaSwagUnavailable when neither works."""
    path = data_path(split)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    url = DATA_URL.format(split=split)
    errors = []
    for attempt in range(2):
        try:
            with urllib.request.urlopen(url, timeout=15) as r:
                data = r.read()
            blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            if split == "val" and blob_id != VAL_BLOB_ID:
                raise ValueError(f"the download has git blob id {blob_id}, not {VAL_BLOB_ID}: cut off or altered")
            parse_examples(data.splitlines(), url)
            with atomic_write(path) as tmp, open(tmp, "wb") as f:
                f.write(data)
            return path
        except (OSError, ValueError, HellaSwagUnavailable) as e:
            errors.append(f"{url}: {reason(e)}")
    try:
        why = hub_unreachable()  # (not twice: each try may wait for its timeout)
        if why:
            raise ConnectionError(why)
        import datasets
        rows = datasets.load_dataset(HF_DATASET, split={"val": "validation"}.get(split, split))
        lines = [json.dumps(dict(row, label=int(row["label"]))) for row in rows]
        if split == "val" and len(lines) != VAL_EXAMPLES:
            raise ValueError(f"it has {len(lines)} examples, not {VAL_EXAMPLES}")
        parse_examples(lines, HF_DATASET)
        with atomic_write(path) as tmp, open(tmp, "w") as f:
            f.write("".join(line + "\n" for line in lines))
        return path
    except Exception as e:
        errors.append(f"{HF_DATASET} on the Hugging Face hub: {reason(e)}")
    raise HellaSwagUnavailable(f"could not get hellaswag_{split}.jsonl ({'; '.join(errors)}); put the file at {path}")


def iterate_examples(split):
    """The lecture's iterate_examples: the split's examples, downloaded the first time."""
    path = data_path(split)
    if not os.path.exists(path):
        path = download(split)
    with open(path, "rb") as f:
        yield from parse_examples(f.readlines(), path)


def render_example(example):
    """The lecture's render_example: (data, tokens, mask, label), where row i of tokens (4, L) is the context and
    then ending i, and mask is 1 on the ending's tokens; rows are padded on the right with zeros."""
    enc = get_encoding()
    ctx_tokens = enc.encode(example["ctx"])
    ending_tokens = [enc.encode(" " + end) for end in example["endings"]]  # GPT-2's words start with a space
    data = {"label": example["label"], "ctx_tokens": ctx_tokens, "ending_tokens": ending_tokens}
    L = max(len(ctx_tokens) + len(end) for end in ending_tokens)
    tokens, mask = torch.zeros((4, L), dtype=torch.long), torch.zeros((4, L), dtype=torch.long)
    for i, end in enumerate(ending_tokens):
        tokens[i, :len(ctx_tokens) + len(end)] = torch.tensor(ctx_tokens + end)
        mask[i, len(ctx_tokens):len(ctx_tokens) + len(end)] = 1
    return data, tokens, mask, example["label"]


def ending_losses(tokens, mask, logits):
    """The loss of each row's ending, summed and averaged over its tokens: (2, rows). logits are the model's
    outputs for tokens[:, :-1], so they predict tokens[:, 1:]."""
    losses = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    m = mask[:, 1:]
    sums = (losses.view_as(m) * m).sum(1)
    return torch.stack([sums, sums / m.sum(1).clamp(min=1)])


def get_most_likely_row(tokens, mask, logits):
    """The lecture's: of one example's 4 rows, the one whose ending has the lowest mean loss (acc_norm)."""
    return ending_losses(tokens, mask, logits)[1].argmin().item()


def score_batch(model, tokens, mask):
    """ending_losses of a batch of rows through `model` (a callable from tokens to logits, or to (logits, ...),
    or a transformers model): model call and loss in one graph under torch.compile."""
    out = model(tokens[:, :-1])
    logits = out if torch.is_tensor(out) else out[0] if isinstance(out, tuple) else out.logits
    return ending_losses(tokens, mask, logits)


def batches(examples, batch_size, block_size, fixed_shapes):
    """(example indices, tokens, mask) batches of examples of similar lengths, longest first (the batch that needs
    the most memory comes first). A row longer than the model's context keeps its last block_size + 1 tokens, as
    lm-evaluation-harness does. With fixed_shapes (compiled) every batch has 4 * batch_size rows and an input
    length that is a multiple of BUCKET."""
    rows = []  # each example's 4 rows as (tokens, mask) lists, cut to the window
    for ex in examples:
        data, tokens, mask, _ = render_example(ex)
        ends = [len(data["ctx_tokens"]) + len(end) for end in data["ending_tokens"]]  # where each row ends
        starts = [max(0, n - block_size - 1) if block_size else 0 for n in ends]
        rows.append([(t[a:n], m[a:n]) for t, m, a, n in zip(tokens, mask, starts, ends)])
    order = sorted(range(len(examples)), key=lambda i: -max(len(t) for t, _ in rows[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        L = max(len(t) for i in idx for t, _ in rows[i])
        n_rows = 4 * len(idx)
        if fixed_shapes:
            L = min(BUCKET * math.ceil((L - 1) / BUCKET), block_size or 10**9) + 1
            n_rows = 4 * batch_size
        tokens, mask = torch.zeros((n_rows, L), dtype=torch.long), torch.zeros((n_rows, L), dtype=torch.long)
        for k, i in enumerate(idx):
            for j, (t, m) in enumerate(rows[i]):
                tokens[4 * k + j, :len(t)], mask[4 * k + j, :len(m)] = t, m
        yield idx, tokens, mask


_compiled = {}  # score_batch compiled, by backend
_prepared = {}  # each evaluation's batches, made once


@torch.no_grad()
def score(model, examples, device, batch_size=8, block_size=None, autocast_dtype=None, compile=False,
          progress=False, prepared=None):
    """The (2, N, 4) summed and mean ending losses of the examples (prepared: their batches, made before).
    compile: torch.compile score_batch, a code object of its own: the eval's shapes never reach the training
    model's compiled graph, and dynamic=False with the bucketed shapes builds one static graph per length bucket,
    once per run."""
    if compile and compile not in _compiled:
        backend = "inductor" if compile is True else compile
        _compiled[compile] = torch.compile(score_batch, dynamic=False, backend=backend)
    fn = _compiled[compile] if compile else score_batch
    out = torch.zeros((2, len(examples), 4))
    with tqdm(total=len(examples), desc="hellaswag", unit="ex", disable=not progress) as bar:
        for idx, tokens, mask in prepared or batches(examples, batch_size, block_size, fixed_shapes=bool(compile)):
            with torch.autocast(torch.device(device).type, autocast_dtype, enabled=autocast_dtype is not None):
                losses = fn(model, tokens.to(device), mask.to(device))
            out[:, idx] = losses[:, :4 * len(idx)].cpu().view(2, -1, 4)  # one copy to the host per batch
            bar.update(len(idx))
    return out


def evaluate(model, examples, device, rank=0, world_size=1, block_size=None, dtype=None, compile=False,
             batch_size=None, progress=False):
    """HellaSwag of `model` (see score_batch) on the examples: (num_correct_norm, num_correct, num_total) over all
    ranks. Rank r scores examples r, r + world_size, ...; with world_size > 1 every rank must call this."""
    key = (id(examples), rank, world_size, block_size, bool(compile), batch_size, str(device))
    if _prepared.get(key, [None])[0] is not examples:  # once per list: training scores the same one at every eval
        mine = examples[rank::world_size]
        # every rank runs as many forward passes as rank 0 (one fewer example: the first again, not counted), since
        # under FSDP each pass is a collective of all ranks
        scored = mine + examples[:1] * (math.ceil(len(examples) / world_size) - len(mine))
        size = max(1, min(batch_size or (32 if torch.device(device).type == "cuda" else 8), len(scored)))
        _prepared[key] = (examples, mine, scored, size, list(batches(scored, size, block_size, bool(compile))))
    _, mine, scored, batch_size, prepared = _prepared[key]  # (the list is kept with its batches: its id stays its own)
    dtype = None if dtype == torch.float32 else dtype
    losses = score(model, scored, device, batch_size, block_size, dtype, compile, progress, prepared)[:, :len(mine)]
    preds = losses.argmin(-1)  # (2, N): by the lowest summed loss (acc) and by the lowest mean loss (acc_norm)
    labels = torch.tensor([ex["label"] for ex in mine], dtype=torch.long)
    counts = torch.tensor([(preds[1] == labels).sum(), (preds[0] == labels).sum(), len(mine)], device=device)
    if world_size > 1:
        dist.all_reduce(counts)
    return tuple(counts.tolist())


def load_for_training(rank, world_size, device):
    """train_gpt2.py's val examples, read before step 0 on every rank, or none and one warning: training then goes
    on without HellaSwag, rather than stop at step 250."""
    examples = []
    error = None
    try:
        if rank == 0:
            examples = list(iterate_examples("val"))  # (downloads the file the first time)
    except HellaSwagUnavailable as e:
        error = e
    if world_size > 1:
        dist.barrier()  # the other ranks read it once rank 0 has it
        try:
            examples = examples or list(iterate_examples("val"))
        except HellaSwagUnavailable as e:
            error = error or e
        ok = torch.tensor(error is None, dtype=torch.long, device=device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # all ranks, or none
        error = error or (None if ok else "another rank could not read it")
    if error and rank == 0:
        print(f"warning: HellaSwag is unavailable, going on without it ({error})", flush=True)
    return [] if error else examples


def load_model(model_type):
    """transformers' GPT-2 (a name or a save_pretrained directory) in float32, as the lecture's script scores it
    (transformers loads a directory in the dtype it was saved in), or HellaSwagUnavailable saying why not. A name
    with the hub unreachable: from the Hugging Face cache, or one line at once. (train_gpt2.py loads it here too.)"""
    from transformers import GPT2LMHeadModel
    directory = os.path.isdir(model_type)
    why = None if directory else hub_unreachable()
    try:  # (a .bin loads weights_only: no code in it runs)
        return GPT2LMHeadModel.from_pretrained(model_type, dtype=torch.float32, local_files_only=why is not None)
    except Exception as e:  # (not on the hub, or not in its cache offline; a missing file; a config not buildable)
        fix = "" if directory else "; give a save_pretrained directory"
        raise HellaSwagUnavailable(f"could not load {model_type} ({why or reason(e)}){fix}") from None


def device_here(name):
    """Whether torch can compute on `name` (cpu, cuda, cuda:N, mps) on this machine."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    return device.type == "cpu" or device.type == "mps" and torch.backends.mps.is_available()


def main(argv=None):
    p = argparse.ArgumentParser(description="HellaSwag accuracy of a GPT-2 model, as the lecture scores it")
    p.error = lambda message: sys.exit(f"hellaswag.py: error: {message}")  # (one line, no usage)
    p.add_argument("-m", "--model_type", default="gpt2", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl or a directory "
                   "written by save_pretrained (for a checkpoint: train_gpt2.py --eval_only --hellaswag 1 --init_from "
                   "FILE)")
    p.add_argument("-d", "--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--limit", type=int, help="the first N examples only")
    p.add_argument("--batch_size", type=int, help="examples per forward pass (default 32 on CUDA, 8 elsewhere)")
    p.add_argument("--compile", action="store_true", help="torch.compile the scoring (a few static graphs)")
    args = p.parse_args(argv)
    try:
        if any(n is not None and n < 1 for n in (args.limit, args.batch_size)):
            raise HellaSwagUnavailable("--limit and --batch_size must be positive")
        if not device_here(args.device):
            raise HellaSwagUnavailable(f"-d {args.device}: no such device here ({torch.cuda.device_count()} GPUs); "
                                       f"give cpu, cuda, cuda:N or mps")
        if os.path.isfile(args.model_type):
            raise HellaSwagUnavailable(f"{args.model_type} is a file, not a transformers model: score a checkpoint "
                                       f"with python train_gpt2.py --eval_only --hellaswag 1 --init_from FILE")
        examples = list(iterate_examples(args.split))[:args.limit]  # the data first: no waiting for a model
        model = load_model(args.model_type)
        if model.config.vocab_size < 50257:  # e.g. a character-level model
            raise HellaSwagUnavailable(f"{args.model_type} has a vocabulary of {model.config.vocab_size} tokens, not "
                                       f"GPT-2's 50257: HellaSwag is scored here with GPT-2's tokenizer")
    except HellaSwagUnavailable as e:
        print(f"hellaswag.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    if args.device.startswith("cuda"):  # float32 with TF32 matmuls, as the lecture's 0.2955 was computed
        torch.set_float32_matmul_precision("high")
    n_norm, n, total = evaluate(model.to(args.device).eval(), examples, args.device, compile=args.compile,
                                block_size=model.config.n_positions, batch_size=args.batch_size, progress=True)
    print(f"{total} acc: {n / total:.4f} acc_norm: {n_norm / total:.4f}")


if __name__ == "__main__":
    main()
