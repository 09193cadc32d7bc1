"""
FineWeb-Edu (or your own text) -> GPT-2 token shards for train_gpt2.py, as in "Let's reproduce GPT-2 (124M)".

    python fineweb.py                                      # fineweb-edu sample-10BT -> edu_fineweb10B/
    python fineweb.py --input input.txt --output_dir own   # your own .txt, .jsonl or .parquet files, offline

The lecture's format: [<|endoftext|>] + encode_ordinary(text) for each document, in order, cut into uint16
shards of --shard_size tokens, edufineweb_{val|train}_{index:06d}.npy, shard 0 val. After a crash the same
command goes on from the last shard, byte-identical.
"""

import argparse
import collections
import glob
import itertools
import json
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from gpt2_tokenizer import EOT, atomic_write, get_encoding, reason

DEFAULT_DATASET = "HuggingFaceFW/fineweb-edu"
DEFAULT_NAME = "sample-10BT"  # (its larger samples: sample-100BT, sample-350BT)
SHARD_SIZE = 10**8  # the lecture's 100M tokens
SMALL_INPUT_SHARDS = 10  # input smaller than a shard: 1 val + 9 train shards
PROGRESS_FILE = ".fineweb_progress.json"  # not named *train* or *val*: DataLoaderLite would take it for a shard
TASK_CHARS = 1 << 20  # text per worker task: ~250k tokens, little pickling per token


def fail(message):
    raise SystemExit(f"fineweb.py: error: {message}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="fineweb.py", description="text -> uint16 GPT-2 token shards for train_gpt2.py")
    p.error = fail  # (one line, no usage)
    a = p.add_argument
    a("--input", nargs="+", metavar="PATH", help="files or globs, in order: .jsonl/.parquet (a document per record), "
      ".txt (one each)")
    a("--dataset", help=f"a Hugging Face data set (default {DEFAULT_DATASET}), its --name and --split")
    a("--name", help=f"default {DEFAULT_NAME} for {DEFAULT_DATASET}")
    a("--split", default="train")
    a("--text_field", default="text", help="the field holding a record's text")
    a("--streaming", action="store_true", help="read the data set as it downloads, no copy in the HF cache")
    a("--output_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "edu_fineweb10B"))
    a("--shard_size", type=float, help=f"tokens per shard (default 1e8; {SMALL_INPUT_SHARDS} shards for less)")
    a("--nprocs", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="tokenizer processes")
    a("--skip_bad", action="store_true", help="skip and count bad records, not stop")
    args = p.parse_args(argv)
    if args.nprocs < 1 or args.shard_size is not None and (args.shard_size < 2 or args.shard_size % 1):
        p.error("--nprocs must be >= 1 and --shard_size a whole number >= 2 (1e8 is fine)")
    args.shard_size = args.shard_size and int(args.shard_size)
    if args.input and (args.dataset or args.name):
        p.error("--dataset and --name choose a Hugging Face data set: not for use with --input")
    args.dataset = args.dataset or DEFAULT_DATASET
    args.name = args.name or (DEFAULT_NAME if args.dataset == DEFAULT_DATASET else None)
    args.paths = [path for pattern in args.input or [] for path in expand(pattern)]
    return args


def expand(pattern):  # the files an --input names
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if os.path.isdir(pattern):
        fail(f"--input {pattern!r} is a directory; name its files, e.g. '{pattern}/*.jsonl'")
    if not paths:
        fail(f"--input {pattern!r} matches no file; check the path")
    return paths


# ----------------------------------------------------------------------------------------------
# reading


class Reader:
    """The input's documents, in order, numbered; a bad one stops the run (--skip_bad: counted). The first `skip`
    (in a resumed run's shards) are not parsed."""

    def __init__(self, args, skip=0):
        self.args = args
        self.skip = skip
        self.record = 0  # the number of the next record read
        self.first_bad = None

    def __iter__(self):
        """Worker tasks of about TASK_CHARS characters: (record numbers, texts)."""
        numbers = []
        texts = []
        chars = 0
        for number, text in self.documents():
            numbers.append(number)
            texts.append(text)
            chars += len(text)
            if chars >= TASK_CHARS:
                yield np.array(numbers), texts
                numbers = []
                texts = []
                chars = 0
        if texts:
            yield np.array(numbers), texts

    def documents(self):
        if self.args.input:
            sources = [self.read_file(p) for p in self.args.paths]
        else:
            sources = [self.read_dataset(self.args.dataset, name=self.args.name, split=self.args.split)]
        for where, text, why in itertools.chain.from_iterable(sources):  # text None: a bad record
            number = self.record
            self.record += 1
            if number < self.skip:
                continue
            if text is not None:
                yield number, text
            elif not self.args.skip_bad:
                fail(f"{where}: {why}; fix it, or pass --skip_bad to skip such records")
            else:
                self.first_bad = self.first_bad or f"{where}: {why}"

    def read_file(self, path):
        field = self.args.text_field
        if os.path.getsize(path) == 0:
            return  # an empty file adds no documents
        if path.lower().endswith(".parquet"):
            yield from self.read_dataset("parquet", data_files=[glob.escape(os.path.abspath(path))], split="train")
            return
        if path.lower().endswith(".txt"):  # one document
            try:
                with open(path, encoding="utf-8") as f:
                    yield path, f.read(), None
            except (OSError, UnicodeDecodeError) as e:
                yield path, None, f"cannot read it ({reason(e)})"
            return
        with open(path, "rb") as f:  # JSON lines: a bad line is one bad record, and the rest of the file is read
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if self.record < self.skip:  # resuming: counted, not parsed
                    yield None, None, None
                    continue
                try:
                    record = json.loads(line)
                    text = record.get(field) if isinstance(record, dict) else None
                    why = None if isinstance(text, str) else f"has no {field!r} text (see --text_field)"
                except ValueError as e:  # not JSON, or not UTF-8
                    text = None
                    why = f"not a JSON record ({reason(e)})"
                yield f"{path} line {lineno}", text if why is None else None, why

    def read_dataset(self, path, **kwargs):
        """A Hugging Face data set, or a .parquet file, through `datasets`."""
        label = kwargs.get("data_files", [path])[0]
        try:
            import datasets
            ds = datasets.load_dataset(path, streaming=self.args.streaming, **kwargs)
            if self.skip and not self.args.input:  # resuming: jump over the records in finished shards
                ds = ds.skip(self.skip)
                self.record = self.skip
            for row in ds.select_columns([self.args.text_field]):
                text = row[self.args.text_field]
                yield f"{label} record {self.record + 1}", text, None if isinstance(text, str) else "no text"
        except Exception as e:
            fail(f"could not read {label}: {reason(e)}; offline, give local files with --input")


# ----------------------------------------------------------------------------------------------
# tokenizing in worker processes (module-level functions: they work under "spawn" as under "fork")


def tokenize(texts):
    """The lecture's tokenize, for many documents: [EOT] + encode_ordinary(text) each (tiktoken's encode with
    disallowed_special=() is encode_ordinary), as one uint16 array, and the documents' lengths."""
    enc = get_encoding()
    parts = []
    for text in texts:
        parts.append(np.array([EOT], dtype=np.uint32))
        try:
            parts.append(enc.encode_to_numpy(text, disallowed_special=()))
        except UnicodeEncodeError:  # lone surrogates: the same repair encode_ordinary makes
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            parts.append(enc.encode_to_numpy(text, disallowed_special=()))
    tokens = np.concatenate(parts)
    assert tokens.max() < 2**16, "token id does not fit in uint16"
    return tokens.astype(np.uint16), np.array([len(p) + 1 for p in parts[1::2]], dtype=np.int64)


def worker_init():
    """Ctrl-C is the main process's; a worker whose main process died (kill -9) exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
    get_encoding()


def ordered_map(pool, fn, items, window):
    """(meta, fn(payload)) for each (meta, payload) in order, at most `window` in flight (bounded memory)."""
    pending = collections.deque()
    for meta, payload in items:
        pending.append((meta, pool.submit(fn, payload)))
        if len(pending) >= window:
            meta, future = pending.popleft()
            yield meta, future.result()
    for meta, future in pending:
        yield meta, future.result()


# ----------------------------------------------------------------------------------------------
# shards, and the progress file that makes a run resumable


def write_datafile(filename, write):
    """The lecture's write_datafile: write(f) under a temporary name, then renamed."""
    try:
        with atomic_write(filename) as tmp, open(tmp, "wb") as f:
            write(f)
    except OSError as e:  # a full disk, say
        fail(f"cannot write {filename}: {reason(e)}; re-run the same command to resume once that is fixed")


def load_progress(out_dir, settings):
    """What an earlier run of this command left; another's shards are an error (mixing is silent corruption)."""
    path = os.path.join(out_dir, PROGRESS_FILE)
    fresh = {"shards": [], "complete": False, "shard_size": None}
    if not os.path.exists(path):
        strays = sorted(glob.glob(os.path.join(glob.escape(out_dir), "edufineweb_*.npy")))
        if strays:
            fail(f"{out_dir} already holds shards this script has no record of ({os.path.basename(strays[0])}, "
                 f"...); remove them or choose another --output_dir")
        return fresh
    try:
        with open(path) as f:
            progress = json.load(f)
        differs = [k for k, v in settings.items() if progress["settings"].get(k) != v]
    except (OSError, ValueError, KeyError) as e:
        fail(f"cannot read {path} ({reason(e)}); remove {out_dir} to start over")
    if differs and progress["shards"]:  # (none yet: nothing to mix up)
        fail(f"{out_dir} holds shards made with another {differs[0]}; remove it or choose another --output_dir")
    return fresh if differs else progress


class ShardWriter:
    """Cuts the tokens into shards, each recorded with its resume point: the first record not wholly in them,
    and how many of its tokens are."""

    def __init__(self, out_dir, settings, progress, size):
        self.out_dir = out_dir
        self.settings = settings
        self.size = size
        self.shards = list(progress["shards"])
        resume = self.shards[-1]["resume"] if self.shards else {"record": 0, "offset": 0, "documents": 0}
        self.skip = resume["offset"]  # tokens of the next document that are in the shards already
        self.documents = resume["documents"]
        self.buf = np.empty(size, dtype=np.uint16)  # the shard being filled
        self.fill = 0

    def add(self, tokens, lengths, records):
        ends = np.cumsum(lengths) - self.skip  # where each document ends within tokens[self.skip:]
        tokens = tokens[self.skip:]
        self.skip = 0
        done = 0
        while done < len(tokens):
            n = min(self.size - self.fill, len(tokens) - done)
            self.buf[self.fill:self.fill + n] = tokens[done:done + n]
            self.fill += n
            done += n
            if self.fill == self.size:
                j = int(np.searchsorted(ends, done, side="right"))  # the first document not wholly written
                if j < len(records):
                    resume = {"record": int(records[j]), "offset": int(done - (ends[j] - lengths[j]))}
                else:
                    resume = {"record": int(records[-1]) + 1, "offset": 0}
                self.write(self.buf, dict(resume, documents=self.documents + j))
                self.fill = 0
        self.documents += len(records)

    def write(self, tokens, resume):
        name = f"edufineweb_{'val' if not self.shards else 'train'}_{len(self.shards):06d}.npy"
        write_datafile(os.path.join(self.out_dir, name), lambda f: np.save(f, tokens))
        self.shards.append({"file": name, "tokens": len(tokens), "resume": resume})
        if resume is not None:  # (the last one is recorded with the summary)
            self.save_progress()

    def save_progress(self, summary=None):  # after the shard is in place: a crash between means redoing it
        state = {"settings": self.settings, "shard_size": self.size, "shards": self.shards,
                 "complete": summary is not None, "summary": summary}
        write_datafile(os.path.join(self.out_dir, PROGRESS_FILE), lambda f: f.write(json.dumps(state).encode()))


# ----------------------------------------------------------------------------------------------
# the run


def main(argv=None):
    args = parse_args(argv)
    out_dir = os.path.abspath(args.output_dir)
    try:  # before any download or tokenizing: can the shards be written?
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"write-test.{os.getpid()}.tmp"), "w") as f:
            os.remove(f.name)
    except OSError as e:
        fail(f"cannot write to --output_dir {out_dir} ({reason(e)})")
    # what decides the bytes, which a resumed run must not change (--skip_bad does not)
    source = [[os.path.realpath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in args.paths]
    settings = {"source": source or [args.dataset, args.name, args.split], "text_field": args.text_field,
                "shard_size": args.shard_size}
    progress = load_progress(out_dir, settings)
    if progress["complete"]:
        print(f"fineweb.py: {out_dir} is complete already. {progress['summary']}")
        return
    for leftover in [f for f in os.listdir(out_dir) if f.endswith(".tmp")]:  # what a killed run was writing
        os.remove(os.path.join(out_dir, leftover))
    try:
        get_encoding()  # here first, so that a tokenizer that cannot load fails in one line
    except RuntimeError as e:
        fail(e)
    from tqdm import tqdm

    start = time.time()
    done = len(progress["shards"])
    writer = ShardWriter(out_dir, settings, progress, progress["shard_size"] or args.shard_size or SHARD_SIZE)
    reader = Reader(args, skip=progress["shards"][-1]["resume"]["record"] if done else 0)
    writer.save_progress()  # (before any shard: a shard on disk is always one of this run's)
    pool = ProcessPoolExecutor(args.nprocs, initializer=worker_init)
    try:  # the workers start before datasets or pyarrow start threads: forking a process with threads can hang
        for future in [pool.submit(os.getpid) for _ in range(args.nprocs)]:
            future.result()
        initial = sum(s["tokens"] for s in writer.shards)
        with tqdm(unit="tok", unit_scale=True, initial=initial, desc="tokens", dynamic_ncols=True) as bar:
            chunks = []  # kept until a shard is written: less than a shard of input is cut again from them
            for numbers, (tokens, lengths) in ordered_map(pool, tokenize, reader, 2 * args.nprocs + 2):
                writer.add(tokens, lengths, numbers)
                chunks = None if writer.shards else chunks + [(tokens, lengths, numbers)]
                bar.update(len(tokens))
        if writer.documents == 0:
            fail("the input holds no documents" + (" with text" if reader.record else "") + "; nothing to write")
        if not writer.shards and args.shard_size:
            fail(f"the input's {writer.fill:,} tokens fit in one --shard_size {args.shard_size:,}: no train shard; "
                 f"give a smaller --shard_size (e.g. {max(2, writer.fill // 10)})")
        if not writer.shards:  # less than one shard: SMALL_INPUT_SHARDS shards, of the tokens made
            writer = ShardWriter(out_dir, settings, progress, -(-writer.fill // SMALL_INPUT_SHARDS))
            for tokens, lengths, numbers in chunks:
                writer.add(tokens, lengths, numbers)
        if writer.fill:
            writer.write(writer.buf[:writer.fill], None)  # the last shard: the remainder
    except BrokenProcessPool:
        fail("a tokenizer process died (out of memory? killed?); re-run the same command to resume")
    except KeyboardInterrupt:
        raise SystemExit("fineweb.py: interrupted; re-run the same command to resume")
    finally:  # (the tasks not yet started are dropped; the few running end in a moment)
        pool.shutdown(cancel_futures=True)
    n = [s["tokens"] for s in writer.shards]
    summary = (f"{writer.documents:,} documents, {sum(n):,} tokens: val {n[0]:,} (shard 0), train {sum(n[1:]):,} "
               f"({len(n) - 1} shards), in {out_dir} ({time.time() - start:.1f}s)")
    if done:
        summary += f"; resumed after shard {done - 1}"
    if reader.record > writer.documents:
        summary += f"; skipped {reader.record - writer.documents:,} bad records (the first: {reader.first_bad})"
    writer.save_progress(summary)
    print(f"fineweb.py: done. {summary}")


if __name__ == "__main__":
    main()
