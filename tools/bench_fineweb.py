"""
fineweb.py against the lecture's tokenization scheme, on the same input, side by side.

    python tools/bench_fineweb.py                      # a ~40 MB corpus made from input.txt
    python tools/bench_fineweb.py --input corpus.jsonl --nprocs 8 --runs 5

The lecture's scheme: one document per task through multiprocessing's Pool.imap (chunksize 16), each document's
[EOT] + encode_ordinary(text) as a uint16 array, copied into the shard being filled. fineweb.py: ~1 MB of text per
task and one array back. Each is run --runs times, alternating, timed from start to the last shard written; the
medians are printed side by side, and whether the two wrote the same bytes.
"""

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fineweb  # noqa: E402
from gpt2_tokenizer import EOT, get_encoding  # noqa: E402


def lecture_tokenize(line):
    """The lecture's worker: one document in, [EOT] + its tokens out."""
    tokens = np.array([EOT] + get_encoding().encode_ordinary(json.loads(line)["text"]))
    assert (0 <= tokens).all() and (tokens < 2**16).all(), "token id does not fit in uint16"
    return tokens.astype(np.uint16)


def lecture_run(path, out_dir, shard_size, nprocs):
    """The lecture's loop: fill a shard buffer, split a document that does not fit across two shards."""
    buf, index, fill, total = np.empty(shard_size, dtype=np.uint16), 0, 0, 0

    def save(tokens):
        np.save(os.path.join(out_dir, f"edufineweb_{'val' if index == 0 else 'train'}_{index:06d}"), tokens)

    with multiprocessing.Pool(nprocs) as pool, open(path) as f:
        for tokens in pool.imap(lecture_tokenize, f, chunksize=16):
            total += len(tokens)
            if fill + len(tokens) < shard_size:
                buf[fill:fill + len(tokens)] = tokens
                fill += len(tokens)
            else:
                room = shard_size - fill
                buf[fill:] = tokens[:room]
                save(buf)
                index, fill = index + 1, len(tokens) - room
                buf[:fill] = tokens[room:]
        if fill:
            save(buf[:fill])
    return total


def shard_bytes(d):
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d)) if n.startswith("edufineweb_")}


def make_corpus(path, megabytes=40):
    """input.txt cut into ~4,000-character documents, repeated to about `megabytes` MB of JSON lines."""
    text = open(os.path.join(ROOT, "input.txt"), encoding="utf-8").read()
    docs = [text[i:i + 4000] for i in range(0, len(text), 4000)]
    with open(path, "w") as f:
        while f.tell() < megabytes * 1e6:
            f.write("".join(json.dumps({"text": d}) + "\n" for d in docs))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", help="a .jsonl with a 'text' field (default: made from input.txt)")
    p.add_argument("--nprocs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--shard_size", type=int, default=10**6)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="bench_fineweb_")
    try:
        path = args.input or os.path.join(work, "corpus.jsonl")
        if not args.input:
            make_corpus(path)
        print(f"input {path} ({os.path.getsize(path) / 1e6:.1f} MB), --nprocs {args.nprocs}, --shard_size "
              f"{args.shard_size:,}, {os.cpu_count()} CPUs, {args.runs} runs each, alternating")
        speeds, same = {"lecture": [], "fineweb.py": []}, True
        for i in range(args.runs):
            dirs = {}
            for scheme in ("lecture", "fineweb.py") if i % 2 == 0 else ("fineweb.py", "lecture"):
                dirs[scheme] = out = tempfile.mkdtemp(dir=work)
                t0 = time.perf_counter()
                if scheme == "lecture":
                    tokens = lecture_run(path, out, args.shard_size, args.nprocs)
                else:
                    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                        fineweb.main(["--input", path, "--output_dir", out, "--shard_size", str(args.shard_size),
                                      "--nprocs", str(args.nprocs)])
                    tokens = sum(len(np.load(os.path.join(out, n))) for n in shard_bytes(out))
                speeds[scheme].append(tokens / (time.perf_counter() - t0))
                print(f"  run {i + 1} {scheme:>10}: {tokens:,} tokens, {speeds[scheme][-1]:,.0f} tokens/s")
            same = same and shard_bytes(dirs["lecture"]) == shard_bytes(dirs["fineweb.py"])
        lecture, ours = (statistics.median(speeds[k]) for k in ("lecture", "fineweb.py"))
        print(f"median tokens/s   lecture {lecture:,.0f}   fineweb.py {ours:,.0f}   speed-up {ours / lecture:.2f}x   "
              f"byte-identical: {'yes' if same else 'NO'}")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
