"""
FineWeb-Edu (or any text data set) -> GPT-2 token shards for train_gpt2.py, as in Karpathy's
"Let's reproduce GPT-2 (124M)".

    python fineweb.py                        # the lecture's run: fineweb-edu sample-10BT -> edu_fineweb10B/
    python fineweb.py --streaming            # same bytes, without the parquet copy in the HF cache
    python fineweb.py --input 'corpus/*.jsonl' --output_dir my_shards      # local files, offline
    python fineweb.py --dataset HuggingFaceFW/fineweb-edu --name sample-100BT --output_dir edu100B
    python fineweb.py --benchmark --input corpus.jsonl --nprocs 2          # speed vs the lecture's scheme

What it writes (the lecture's format, which DataLoaderLite in train_gpt2.py reads as is): every
document becomes [<|endoftext|>] + encode_ordinary(text); those tokens, in input order, form one
stream that is cut into shards of --shard_size tokens (a document may straddle two shards), each
saved with np.save as uint16 in {output_dir}/edufineweb_{split}_{index:06d}.npy. Shard 0 is "val",
every later one "train"; the last one holds the remainder.

Beyond the lecture: local files (--input) for machines without internet, other data sets, streaming,
crash-safe resumable output, clear errors on bad input. Everything is read through Hugging Face
`datasets`, local files included.

Speed: the lecture sends each document to a worker as its own task (Pool.imap, chunksize 16) and gets
a small array back. Here a task is ~1 MB of text (only the text column is read) and comes back as
one uint16 array plus the documents' lengths, so the per-document pickling and IPC are gone; the
bytes are the same. `--benchmark` measures both on your input.

Resuming: each shard is written under a temporary name and renamed, then recorded in
{output_dir}/.fineweb_progress.json together with where the input stands at that shard's end
(record number, and how many tokens of that record are already in earlier shards). Re-running the
same command after a crash skips the records behind the last recorded shard without tokenizing them
and goes on from there; the result is byte-identical to an uninterrupted run.

Bad input (a missing file, a record without text, undecodable bytes, no documents at all) stops the
run with a one-line error before anything wrong is written; --skip_bad skips and counts bad records
and unreadable files instead.

Testing hook: FINEWEB_SLEEP_AFTER_SHARD=SECONDS makes the run sleep after each shard file is in
place but before it is recorded, so a test can kill it at that most awkward moment.
"""

import argparse
import collections
import functools
import glob
import itertools
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from gpt2_tokenizer import EOT

DEFAULT_DATASET = "HuggingFaceFW/fineweb-edu"
DEFAULT_NAME = "sample-10BT"  # only when --dataset is the default
DEFAULT_SPLIT = "train"
DEFAULT_OUTPUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "edu_fineweb10B")
SHARD_NAME = "edufineweb_{split}_{index:06d}.npy"
# DataLoaderLite picks every file whose name contains "train" or "val": our own files must not
PROGRESS_FILE = ".fineweb_progress.json"
TMP_NAME = ".fineweb_partial.tmp"  # one file is written at a time
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
READ_ROWS = 256  # records per read from datasets (FineWeb-Edu's average a few thousand characters)
TASK_CHARS = 1 << 20  # text per worker task: ~250k tokens, tens of ms of work, little IPC per token


def fail(message):
    """Stop with one line on stderr; exit status 1."""
    raise SystemExit(f"fineweb.py: error: {message}")


def one_line(exc):
    """'Type: first line of the message' of an exception, or of what caused it inside datasets."""
    while exc.__cause__ is not None and type(exc).__name__ == "DatasetGenerationError":
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# ----------------------------------------------------------------------------------------------
# command line


def token_count(text):
    """--shard_size accepts 100000000, 100_000_000 or 1e8."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"must be a whole number of tokens >= 1, got {text!r}")
    return int(value)


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="fineweb.py",
        description="Tokenize a text data set with GPT-2's BPE into uint16 .npy shards for train_gpt2.py.",
    )
    p.add_argument("--input", nargs="+", metavar="PATH",
                   help="local files or globs instead of a Hugging Face data set: .jsonl/.json/.parquet "
                        "(a document per record) or .txt (a document per file); read in the order given, "
                        "each glob sorted")
    p.add_argument("--dataset", help=f"Hugging Face data set (default {DEFAULT_DATASET})")
    p.add_argument("--name", help=f"its configuration (default {DEFAULT_NAME} for {DEFAULT_DATASET})")
    p.add_argument("--split", help=f"its split (default {DEFAULT_SPLIT})")
    p.add_argument("--text_field", default="text", help="the field holding a record's text (default text)")
    p.add_argument("--streaming", action="store_true",
                   help="read the data as it downloads instead of first copying it into the HF cache")
    p.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR,
                   help="where the shards go (default edu_fineweb10B/ next to this script)")
    p.add_argument("--shard_size", type=token_count, default=10**8, help="tokens per shard (default 1e8)")
    p.add_argument("--nprocs", type=positive_int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="tokenizer processes (default: half the CPU cores)")
    p.add_argument("--skip_bad", action="store_true",
                   help="skip (and count) records without text and files that cannot be read, "
                        "instead of stopping at the first one")
    p.add_argument("--benchmark", action="store_true",
                   help="time the lecture's tokenization scheme and this one on the same input, "
                        "compare their bytes, and print tokens/s for both")
    args = p.parse_args(argv)
    if args.input:
        given = [f"--{k}" for k in ("dataset", "name", "split") if getattr(args, k) is not None]
        if given:
            p.error(f"{' and '.join(given)} choose a Hugging Face data set: not for use with --input")
        args.paths = expand_inputs(args.input)
    else:
        if args.dataset is None:
            args.dataset = DEFAULT_DATASET
        if args.name is None and args.dataset == DEFAULT_DATASET:
            args.name = DEFAULT_NAME
        args.split = args.split or DEFAULT_SPLIT
    return args


# ----------------------------------------------------------------------------------------------
# the input: Hugging Face data sets and local files, all read through `datasets`


class Source:
    """One load_dataset() call's worth of input: a Hugging Face split, one local file, or a run of .txt files."""

    def __init__(self, label, builder=None, paths=(), hub=None):
        self.label = label  # for messages
        self.builder = builder  # "json" / "parquet" / "text" for local files
        self.paths = list(paths)
        self.hub = hub  # load_dataset's path/name/split for a Hugging Face data set
        self.ds = None  # the datasets object, once loaded
        self.rows = None  # how many records it holds, when that is known up front (for the ETA)


def expand_inputs(patterns):
    """Paths in the order given, each glob's matches sorted; a clear error for anything amiss."""
    paths = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                fail(f"--input {pattern!r} matched no files; check the path")
        elif os.path.isdir(pattern):
            fail(f"--input {pattern!r} is a directory; name its files, e.g. {os.path.join(pattern, '*.jsonl')!r}")
        elif not os.path.isfile(pattern):
            fail(f"--input file {pattern!r} does not exist; check the path")
        else:
            matches = [pattern]
        for path in matches:
            if os.path.splitext(path)[1].lower() not in BUILDERS:
                fail(f"--input {path!r}: unknown file type; use .jsonl, .json, .parquet (records with a "
                     f"text field) or .txt (one document per file)")
        paths += matches
    return paths


def make_sources(args):
    """The hub data set, or a Source per local .jsonl/.json/.parquet file (so that an error names its
    file) with consecutive .txt files sharing one (a load_dataset call per small file would cost more
    than tokenizing it)."""
    if not args.input:
        hub = {"path": args.dataset, "name": args.name, "split": args.split}
        return [Source(f"{args.dataset} ({args.name or 'default'}, {args.split})", hub=hub)]
    sources = []
    for path in args.paths:
        if os.path.getsize(path) == 0:
            print(f"fineweb.py: note: {path} is empty; it adds no documents", file=sys.stderr)
            continue
        builder = BUILDERS[os.path.splitext(path)[1].lower()]
        if builder == "text" and sources and sources[-1].builder == "text":
            sources[-1].paths.append(path)
            sources[-1].label = f"{sources[-1].paths[0]} (and {len(sources[-1].paths) - 1} more .txt files)"
        else:
            sources.append(Source(path, builder, [path]))
    return sources


def load(source, streaming):
    """load_dataset on the hub or on local files; returns a Dataset or, streaming, an IterableDataset."""
    from datasets import load_dataset

    if source.hub:
        return load_dataset(**source.hub, streaming=streaming)
    kwargs = {"sample_by": "document"} if source.builder == "text" else {}  # a .txt file = one document
    files = [glob.escape(os.path.abspath(p)) for p in source.paths]  # datasets reads data_files as globs
    return load_dataset(source.builder, data_files=files, split="train", streaming=streaming, **kwargs)


def known_rows(source):
    """How many records a Source holds, if that can be told without tokenizing it (for the ETA)."""
    ds = source.ds
    if hasattr(ds, "__len__"):
        return len(ds)
    split = (getattr(ds.info, "splits", None) or {}).get(source.hub["split"] if source.hub else "train")
    if split is not None and split.num_examples:  # hub metadata, parquet footers
        return split.num_examples
    if source.builder == "text":
        return len(source.paths)
    if source.paths[0].lower().endswith(".jsonl"):
        lines, last = 0, b"\n"  # one fast pass over the bytes, well worth an ETA
        with open(source.paths[0], "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                lines += block.count(b"\n")
                last = block
        return lines + (not last.endswith(b"\n"))
    return None


class Reader:
    """The input's documents, in order and in batches, every record numbered (a resume point is a
    record number). Records without text and unreadable files stop the run or, with --skip_bad, are
    skipped and counted."""

    def __init__(self, args, skip=0):
        self.args = args
        self.skip = skip  # records already in finished shards: passed over, not handed out
        self.record = 0  # number of the next record, over the whole input
        self.bad_files = []  # (a resumed run finds those before its resume point again: they are read)
        self.sources = make_sources(args)

    def open(self):
        """load_dataset every source now: without --streaming this reads (or downloads) everything, as
        the lecture's load_dataset does, so that an unreadable file stops the run before any shard."""
        if not self.sources:
            fail("the input holds no documents; nothing to write")
        import datasets  # (slow to import: not before it is needed)

        if self.args.input:  # local files: no per-file progress bars or log lines (our errors say it all)
            datasets.disable_progress_bars()
            datasets.logging.set_verbosity(datasets.logging.CRITICAL)
        opened = []
        for source in self.sources:
            try:
                source.ds = load(source, self.args.streaming)
            except Exception as e:
                if source.hub:
                    fail(f"could not load {source.label}: {one_line(e)}; without internet, point --input "
                         f"at local .parquet/.jsonl files")
                if len(source.paths) > 1:  # a run of .txt files: find the culprit one file at a time
                    opened += self.open_each(source.builder, source.paths)
                else:
                    self.file_failed(source.paths[0], e, 0)
                continue
            source.rows = known_rows(source)
            opened.append(source)
        self.sources = opened
        if not opened:
            fail("the input holds no documents; nothing to write")

    def open_each(self, builder, paths):
        opened = []
        for path in paths:
            source = Source(path, builder, [path])
            try:
                source.ds = load(source, self.args.streaming)
                source.rows = 1
                opened.append(source)
            except Exception as e:
                self.file_failed(path, e, 0)
        return opened

    def total_rows(self):
        rows = [s.rows for s in self.sources]
        return None if None in rows else sum(rows)

    def file_failed(self, path, exc, done):
        where = f" after {done} of its records" if done else ""
        if not self.args.skip_bad:
            fail(f"cannot read {path}{where}: {one_line(exc)}; fix or remove the file, or pass --skip_bad "
                 f"to skip it")
        print(f"fineweb.py: skipping {path}{where}: {one_line(exc)}", file=sys.stderr)
        self.bad_files.append(path)

    def batches(self):
        """(texts, their record numbers) for the input's documents, in order."""
        for source in self.sources:
            for texts, pos in self.column(source):  # pos: number of texts[0] within its source
                first = self.record
                self.record += len(texts)
                if self.skip:  # resuming: these records are in the shards on disk already
                    n = min(self.skip, len(texts))
                    self.skip -= n
                    texts, first, pos = texts[n:], first + n, pos + n
                good = [i for i, text in enumerate(texts) if type(text) is str]
                if len(good) < len(texts):
                    self.bad_record(source, texts, pos)
                    texts = [texts[i] for i in good]
                if texts:
                    yield texts, first + np.array(good, dtype=np.int64)

    def bad_record(self, source, texts, pos):
        if self.args.skip_bad:
            return  # counted in the summary as records minus documents
        i = next(i for i, text in enumerate(texts) if type(text) is not str)
        field = self.args.text_field
        what = f"has no {field!r} field" if texts[i] is None else f"has a {type(texts[i]).__name__} as {field!r}"
        columns = source.ds.column_names
        fields = f" (the fields: {', '.join(columns)})" if columns else ""
        fail(f"{source.label}: record {pos + i + 1} {what}{fields}; name the text field with --text_field, "
             f"or pass --skip_bad to skip such records")

    def column(self, source):
        """(values of the text field, None where a record lacks it; position in the source), READ_ROWS
        at a time. An error from datasets ends the source: stop, or skip the rest under --skip_bad."""
        ds, done = source.ds, 0
        field = "text" if source.builder == "text" else self.args.text_field  # a .txt file's text is "text"
        columns = ds.column_names
        if columns and field in columns and len(columns) > 1:
            ds = ds.select_columns([field])  # don't make Python objects of the other columns
        if self.skip and hasattr(ds, "__len__"):  # resuming: jump over whole records, unread
            done = min(self.skip, len(ds))
            self.skip -= done
            self.record += done
            ds = ds.skip(done)
        batches = iter(ds.iter(batch_size=READ_ROWS))
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as e:
                if source.hub:
                    fail(f"reading {source.label} failed after {done} records: {one_line(e)}; re-run the "
                         f"same command to resume")
                if len(source.paths) > 1:  # .txt files, a document each: the first `done` were fine
                    for single in self.open_each(source.builder, source.paths[done:]):
                        yield from self.column(single)
                else:
                    self.file_failed(source.paths[0], e, done)
                return
            texts = batch.get(field)
            if texts is None:  # not one record of this batch has the field
                texts = [None] * len(next(iter(batch.values())))
            yield texts, done
            done += len(texts)


# ----------------------------------------------------------------------------------------------
# tokenization, in worker processes


class WorkerError(RuntimeError):
    """An error inside a worker, as one line (the pool re-raises it in the main process)."""


_encoding = None


def encoder():
    global _encoding
    if _encoding is None:
        from gpt2_tokenizer import get_encoding

        _encoding = get_encoding()
    return _encoding


def worker_init(parent):
    """Ctrl-C is for the main process to handle (it stops the pool). A worker whose main process died
    (kill -9) would wait for work forever: it exits instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def warm_up():
    """Load the tokenizer now, so that an error shows before any reading starts."""
    try:
        encoder()
    except Exception as e:
        raise WorkerError(f"could not load the tokenizer: {one_line(e)}") from None


_EOT = np.array([EOT], dtype=np.uint32)


def encode(enc, text):
    """encode_ordinary(text) as a uint32 array. tiktoken documents encode(text, disallowed_special=())
    as equivalent to encode_ordinary; its numpy variant skips building a Python list of ints."""
    try:
        return enc.encode_to_numpy(text, disallowed_special=())
    except UnicodeEncodeError:  # lone surrogates: the same repair encode_ordinary makes
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return enc.encode_to_numpy(text, disallowed_special=())


def tokenize_batch(texts):
    """[EOT] + tokens(text) for each text, concatenated as uint16, and each document's length."""
    try:
        enc = encoder()
        parts = []
        for text in texts:
            parts.append(_EOT)
            parts.append(encode(enc, text))
        tokens = np.concatenate(parts)
        assert tokens.max() < 2**16, "token id does not fit in uint16"
        lengths = np.fromiter((len(p) for p in parts[1::2]), dtype=np.int64, count=len(texts)) + 1
        return tokens.astype(np.uint16), lengths
    except Exception as e:
        raise WorkerError(f"tokenizing failed: {one_line(e)}") from None


def ordered_map(pool, fn, items, window):
    """pool.submit(fn, payload) for each (meta, payload), results yielded in input order with their
    meta. At most `window` tasks in flight, so memory stays bounded however large the input."""
    pending = collections.deque()
    for meta, payload in items:
        pending.append((meta, pool.submit(fn, payload)))
        if len(pending) >= window:
            meta, future = pending.popleft()
            yield meta, future.result()
    while pending:
        meta, future = pending.popleft()
        yield meta, future.result()


def tasks(reader):
    """The reader's documents grouped into worker tasks of about TASK_CHARS characters:
    (record numbers, texts)."""
    texts, records, chars = [], [], 0
    for batch, numbers in reader.batches():
        texts += batch
        records.append(numbers)
        chars += sum(map(len, batch))
        if chars >= TASK_CHARS:
            yield np.concatenate(records), texts
            texts, records, chars = [], [], 0
    if texts:
        yield np.concatenate(records), texts


# ----------------------------------------------------------------------------------------------
# output: shards, and the progress file that makes a run resumable


def settings_of(args):
    """What decides the output's bytes; a resumed run must have the same."""
    if args.input:
        source = {"input": [[os.path.realpath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in args.paths]}
    else:
        source = {"dataset": args.dataset, "name": args.name, "split": args.split}
    # (not --skip_bad: a run that stopped at a bad record may go on with it, same bytes as skipping from the start)
    return {"source": source, "text_field": args.text_field, "shard_size": args.shard_size}


def shard_length(path):
    """Tokens in a uint16 .npy shard; None if it is missing or not one."""
    try:
        tokens = np.load(path, mmap_mode="r")  # reads the header only
    except (OSError, ValueError):
        return None
    return len(tokens) if tokens.dtype == np.uint16 and tokens.ndim == 1 else None


def load_progress(out_dir, settings):
    """What an earlier run of the same command left: its recorded shards that are still intact on disk
    (a prefix; whatever follows is made again) and whether it finished. Different settings, or shards
    with no progress file, are an error: mixing two runs' shards would be silent corruption."""
    path = os.path.join(out_dir, PROGRESS_FILE)
    if not os.path.exists(path):
        strays = sorted(glob.glob(os.path.join(glob.escape(out_dir), "edufineweb_*.npy")))
        if strays:
            fail(f"{out_dir} already holds shards this script has no record of ({os.path.basename(strays[0])}"
                 f", ...); remove them or choose another --output_dir")
        return {"shards": [], "complete": False}
    try:
        with open(path) as f:
            progress = json.load(f)
        recorded = progress["settings"]
    except (OSError, ValueError, KeyError) as e:
        fail(f"cannot read {path} ({one_line(e)}); remove {out_dir} to start over")
    for key, value in settings.items():
        if recorded.get(key) != value:
            what = "the input files differ" if key == "source" else f"--{key} differs"
            fail(f"{out_dir} holds shards made with other settings ({what}); remove it or choose another "
                 f"--output_dir")
    intact = []
    for shard in progress["shards"]:
        if shard_length(os.path.join(out_dir, shard["file"])) != shard["tokens"]:
            break
        intact.append(shard)
    progress["complete"] = progress["complete"] and len(intact) == len(progress["shards"])
    progress["shards"] = intact
    return progress


def write_atomically(path, write):
    """write(file) under a temporary name, then rename: nobody ever sees a half-written file."""
    tmp = os.path.join(os.path.dirname(path), TMP_NAME)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except OSError as e:  # a full disk, say
        fail(f"cannot write {path}: {one_line(e)}; re-run the same command to resume once that is fixed")


class ShardWriter:
    """Cuts the token stream into shards and records each finished one with its resume point."""

    def __init__(self, out_dir, settings, progress):
        self.out_dir, self.settings, self.size = out_dir, settings, settings["shard_size"]
        self.shards = list(progress["shards"])
        resume = self.shards[-1]["resume"] if self.shards else {"record": 0, "offset": 0, "documents": 0}
        self.skip = resume["offset"]  # tokens of the first document that are in the previous shard
        self.documents = resume["documents"]  # documents before the next task
        self.buf = np.empty(self.size, dtype=np.uint16)
        self.fill = 0
        self.sleep = float(os.environ.get("FINEWEB_SLEEP_AFTER_SHARD", 0))  # test hook, see the top

    def add(self, tokens, lengths, records):
        """Append a task's output: its documents' tokens, each one's length, their record numbers."""
        ends = np.cumsum(lengths) - self.skip  # where each document ends within tokens[self.skip:]
        tokens = tokens[self.skip:]
        self.skip = 0
        done = 0
        while done < len(tokens):
            n = min(self.size - self.fill, len(tokens) - done)
            self.buf[self.fill:self.fill + n] = tokens[done:done + n]
            self.fill, done = self.fill + n, done + n
            if self.fill == self.size:
                # the resume point: the first document not wholly behind us, and how much of it is
                j = int(np.searchsorted(ends, done, side="right"))
                if j < len(records):
                    resume = {"record": int(records[j]), "offset": int(done - (ends[j] - lengths[j]))}
                else:
                    resume = {"record": int(records[-1]) + 1, "offset": 0}
                self.write(self.buf, dict(resume, documents=self.documents + j))
                self.fill = 0
        self.documents += len(records)

    def flush(self):
        """The last shard: what is left, if anything."""
        if self.fill:
            self.write(self.buf[:self.fill], None)
            self.fill = 0

    def write(self, tokens, resume):
        name = SHARD_NAME.format(split="val" if not self.shards else "train", index=len(self.shards))
        # np.save on a file object adds no ".npy" to the name; the bytes are the lecture's np.save's
        write_atomically(os.path.join(self.out_dir, name), lambda f: np.save(f, tokens))
        if self.sleep:
            time.sleep(self.sleep)
        self.shards.append({"file": name, "tokens": len(tokens), "resume": resume})
        if resume is not None:  # (the last shard is recorded with the summary)
            self.save_progress()

    def save_progress(self, summary=None):
        """Recorded after the shard is in place: a crash in between only means making it again.
        With a summary, the run is complete."""
        state = {"settings": self.settings, "shards": self.shards, "complete": summary is not None,
                 "summary": summary}
        write_atomically(os.path.join(self.out_dir, PROGRESS_FILE),
                         lambda f: f.write(json.dumps(state, indent=1).encode()))

    def tokens(self):
        return sum(s["tokens"] for s in self.shards) + self.fill


# ----------------------------------------------------------------------------------------------
# the run


def run(args, quiet=False):
    """Tokenize the input into shards in args.output_dir, or finish an interrupted run; return the summary."""
    out_dir = os.path.abspath(args.output_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        fail(f"--output_dir {out_dir} is a file, not a directory")
    settings = settings_of(args)
    progress = load_progress(out_dir, settings)
    if progress["complete"]:
        if not quiet:
            print(f"fineweb.py: {out_dir} is complete already; nothing to do. {describe(progress['summary'])}")
        return progress["summary"]
    start = time.time()
    pool = ProcessPoolExecutor(args.nprocs, initializer=worker_init, initargs=(os.getpid(),))
    try:
        warm_up()  # here first: workers forked from this process (Linux) inherit the tokenizer
        # Start the workers now: before datasets and pyarrow start threads (forking a process that
        # has threads can deadlock), and so that a tokenizer that cannot load fails right away.
        for future in [pool.submit(warm_up) for _ in range(args.nprocs)]:
            future.result()
        writer = ShardWriter(out_dir, settings, progress)
        resume_at = progress["shards"][-1]["resume"]["record"] if progress["shards"] else 0
        reader = Reader(args, skip=resume_at)
        reader.open()
        tokens_before = writer.tokens()
        bar = progress_bar(tokens_before, reader.total_rows(), quiet)
        try:
            for records, (tokens, lengths) in ordered_map(pool, tokenize_batch, tasks(reader), 2 * args.nprocs + 2):
                writer.add(tokens, lengths, records)
                bar.advance(len(tokens), int(records[-1]) + 1)
            bar.total = bar.n  # the estimate's work is done
        finally:
            bar.close()  # before any error message, which would otherwise land on the bar's line
        if writer.documents == 0:
            fail("the input holds no documents" + (" with text" if reader.record else "") + "; nothing to write")
        writer.flush()
        seconds = time.time() - start
        summary = {"documents": writer.documents, "bad_records": reader.record - writer.documents,
                   "bad_files": len(reader.bad_files), "tokens": writer.tokens(), "shards": len(writer.shards),
                   "output_dir": out_dir, "seconds": round(seconds, 2),
                   "tokens_per_s": round((writer.tokens() - tokens_before) / seconds),
                   "resumed_at_shard": len(progress["shards"])}
        writer.save_progress(summary)
    except WorkerError as e:
        fail(e)
    except BrokenProcessPool:
        fail("a tokenizer process died (out of memory? killed?); re-run the same command to resume")
    except KeyboardInterrupt:
        raise SystemExit("fineweb.py: interrupted; re-run the same command to resume")
    finally:  # on an error, don't wait for the tasks in flight
        pool.shutdown(wait=sys.exc_info()[0] is None, cancel_futures=True)
    if os.path.exists(os.path.join(out_dir, TMP_NAME)):
        os.remove(os.path.join(out_dir, TMP_NAME))  # an interrupted run's leftover
    if not quiet:
        print(f"fineweb.py: done. {describe(summary)}")
    return summary


def describe(summary):
    """The end-of-run summary line."""
    s = summary
    text = (f"{s['documents']:,} documents, {s['tokens']:,} tokens, {s['shards']} shards (1 val + "
            f"{s['shards'] - 1} train) in {s['output_dir']}; {s['tokens_per_s']:,} tokens/s over {s['seconds']}s")
    if s["resumed_at_shard"]:
        text += f" (resumed at shard {s['resumed_at_shard']})"
    skipped = [f"{s['bad_records']:,} records without text"] if s["bad_records"] else []
    skipped += [f"{s['bad_files']} unreadable files"] if s["bad_files"] else []
    return text + (f"; skipped {' and '.join(skipped)}" if skipped else "")


def progress_bar(initial, rows, quiet):
    """A tqdm bar in tokens. The data's total in tokens is not known up front: when its number of
    records is, the total (hence the ETA) is estimated from the tokens per record so far."""
    from tqdm import tqdm

    bar = tqdm(unit="tok", unit_scale=True, initial=initial, disable=quiet, desc="tokens", smoothing=0.05,
               dynamic_ncols=True)

    def advance(tokens, records_done):
        if rows:
            bar.total = max(bar.n + tokens, round((bar.n + tokens) / records_done * rows))
        bar.update(tokens)

    bar.advance = advance
    return bar


# ----------------------------------------------------------------------------------------------
# --benchmark: the lecture's scheme against this one, same input, same number of processes


def lecture_tokenize(doc, field="text"):
    """The lecture's worker: one document in, its [EOT] + tokens out as a uint16 array."""
    ids = [EOT] + encoder().encode_ordinary(doc[field])
    array = np.array(ids)
    assert (0 <= array).all() and (array < 2**16).all(), "token id does not fit in uint16"
    return array.astype(np.uint16)


def lecture_run(args, out_dir):
    """The lecture's loop: Pool(nprocs).imap(tokenize, documents, chunksize=16), each result copied
    into the shard being filled, a document that does not fit split across two shards. (Like the
    lecture's, it assumes that no document is longer than a shard.)"""
    import multiprocessing

    reader = Reader(args)
    reader.open()
    documents = itertools.chain.from_iterable(source.ds for source in reader.sources)
    tokenize = functools.partial(lecture_tokenize, field=args.text_field)
    buf = np.empty(args.shard_size, dtype=np.uint16)
    index, fill, total = 0, 0, 0

    def save(tokens):
        split = "val" if index == 0 else "train"
        np.save(os.path.join(out_dir, f"edufineweb_{split}_{index:06d}"), tokens)

    with multiprocessing.Pool(args.nprocs) as pool:
        for tokens in pool.imap(tokenize, documents, chunksize=16):
            total += len(tokens)
            if fill + len(tokens) < args.shard_size:
                buf[fill:fill + len(tokens)] = tokens
                fill += len(tokens)
            else:
                room = args.shard_size - fill
                buf[fill:] = tokens[:room]
                save(buf)
                index += 1
                fill = len(tokens) - room
                buf[:fill] = tokens[room:]
        if fill:
            save(buf[:fill])
    return total


def same_shards(dir_a, dir_b):
    names = sorted(n for n in os.listdir(dir_a) if n.startswith("edufineweb_"))
    if names != sorted(n for n in os.listdir(dir_b) if n.startswith("edufineweb_")):
        return False
    for name in names:
        with open(os.path.join(dir_a, name), "rb") as a, open(os.path.join(dir_b, name), "rb") as b:
            if a.read() != b.read():
                return False
    return True


def benchmark(args, runs=3):
    """Each scheme `runs` times in alternation, timed from start to last shard written; median tokens/s."""
    import statistics

    reader = Reader(args)
    reader.open()  # fills the datasets cache once, so that neither timed run pays for it
    encoder()  # loaded before the pools fork, as the lecture's module-level `enc` is
    print(f"benchmark: {', '.join(s.label for s in reader.sources)}; --nprocs {args.nprocs}, "
          f"--shard_size {args.shard_size:,}, {'streaming' if args.streaming else 'not streaming'}, "
          f"{os.cpu_count()} CPUs")
    speeds = {"lecture": [], "fineweb.py": []}
    identical = True
    for i in range(runs):
        dirs = {}
        for scheme in (["lecture", "fineweb.py"] if i % 2 == 0 else ["fineweb.py", "lecture"]):
            dirs[scheme] = tempfile.mkdtemp(prefix="fineweb_benchmark_")
            start = time.perf_counter()
            if scheme == "lecture":
                tokens = lecture_run(args, dirs[scheme])
            else:
                tokens = run(argparse.Namespace(**dict(vars(args), output_dir=dirs[scheme])), quiet=True)["tokens"]
            speeds[scheme].append(tokens / (time.perf_counter() - start))
            print(f"  run {i + 1} {scheme:>10}: {tokens:,} tokens, {speeds[scheme][-1]:,.0f} tokens/s")
        identical = identical and same_shards(dirs["lecture"], dirs["fineweb.py"])
        for d in dirs.values():
            shutil.rmtree(d)
    lecture, ours = (statistics.median(speeds[k]) for k in ("lecture", "fineweb.py"))
    print(f"median of {runs}: lecture {lecture:,.0f} tokens/s, fineweb.py {ours:,.0f} tokens/s, "
          f"speed-up {ours / lecture:.2f}x; output byte-identical: {'yes' if identical else 'NO'}")
    return lecture, ours, identical


def main(argv=None):
    args = parse_args(argv)
    if args.benchmark:
        benchmark(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
