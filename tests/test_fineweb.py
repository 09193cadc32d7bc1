"""fineweb.py end to end: the real command line on small corpora written here, read through `datasets`.

The expected shards are computed independently: tiktoken's encode_ordinary on each document, [EOT]
before each, the stream cut every --shard_size tokens, each piece np.save'd (the lecture's recipe).
"""
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fineweb
from conftest import REPO, run_script
from gpt2_tokenizer import EOT, get_encoding

SHARD = 1000  # tokens per shard in these tests
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but "
         "have an they you were her she there one all we their learning school river energy cell").split()
ODD = ["naïve café", "日本語のテキスト", "emoji 🙂🚀", "<|endoftext|> stays text", "  spaces   and\n\nlines\n",
       "tab\there", "'single' \"double\"", "3.14159 and 12,345", "\u00a0nbsp", "x" * 300]


# ---------------------------------------------------------------------------------------------- helpers


def make_docs(n, seed):
    """n documents of 0..120 words, some with unusual characters; document 3 is empty."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(0, 120))]
        if rng.random() < 0.3:
            words.insert(rng.randint(0, len(words)), rng.choice(ODD))
        docs.append(" ".join(words))
    docs[3] = ""  # an empty document is still an <|endoftext|>
    return docs


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def expected_shards(texts, shard_size=SHARD):
    """{file name: bytes} as the lecture's recipe makes them."""
    enc = get_encoding()
    stream = np.array([t for text in texts for t in [EOT] + enc.encode_ordinary(text)], dtype=np.uint16)
    out = {}
    for k, start in enumerate(range(0, len(stream), shard_size)):
        buf = io.BytesIO()
        np.save(buf, stream[start:start + shard_size])
        out[f"edufineweb_{'val' if k == 0 else 'train'}_{k:06d}.npy"] = buf.getvalue()
    return out


def shards(out_dir):
    """{file name: bytes} of the shards in out_dir, in shard order."""
    paths = sorted(Path(out_dir).glob("edufineweb_*.npy"), key=lambda p: p.name.split("_")[-1])
    return {p.name: p.read_bytes() for p in paths}


def env(tmp, **extra):
    e = dict(os.environ)
    e.update({"HF_DATASETS_CACHE": str(tmp / "hf_cache"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    e.pop("FINEWEB_SLEEP_AFTER_SHARD", None)
    e.update(extra)
    return e


def cli(tmp, *args, ok=True, **extra_env):
    """Run python fineweb.py ARGS; with ok, assert it succeeded; return the CompletedProcess."""
    r = run_script("fineweb.py", *args, env=env(tmp, **extra_env), timeout=120)
    if ok:
        assert r.returncode == 0, r.stderr
    return r


def error_line(r):
    """The run failed with one line that says why, last on stderr (after the progress bar, if any); return it."""
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("fineweb.py: error: "), r.stderr
    assert "Traceback" not in r.stderr and not [x for x in lines[:-1] if "error" in x.lower()], r.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """300 documents in a .jsonl (with other fields, as FineWeb-Edu has), and a reference run of it."""
    tmp = tmp_path_factory.mktemp("corpus")
    docs = make_docs(300, seed=0)
    path = write_jsonl(tmp / "docs.jsonl", [{"id": i, "text": d, "score": 3.5} for i, d in enumerate(docs)])
    ref = tmp / "ref"
    r = cli(tmp, "--input", path, "--output_dir", ref, "--shard_size", SHARD, "--nprocs", 1)
    return {"tmp": tmp, "docs": docs, "path": path, "ref": ref, "stdout": r.stdout}


# ---------------------------------------------------------------------------------------------- output


def test_shards_are_the_lectures_bytes(corpus):
    got, want = shards(corpus["ref"]), expected_shards(corpus["docs"])
    assert list(got) == list(want)  # same names: val first, then train, numbered from 0
    assert list(got)[:2] == ["edufineweb_val_000000.npy", "edufineweb_train_000001.npy"]
    assert got == want
    lengths = [len(np.load(corpus["ref"] / name)) for name in got]
    assert lengths[:-1] == [SHARD] * (len(lengths) - 1) and 0 < lengths[-1] <= SHARD  # the last: remainder
    assert len(lengths) > 10
    # the summary line
    assert "300 documents" in corpus["stdout"] and f"{len(lengths)} shards" in corpus["stdout"]
    assert "tokens/s" in corpus["stdout"]
    # nothing else in the directory that a loader picking names with "train"/"val" could pick up
    others = [p.name for p in corpus["ref"].iterdir() if not p.name.startswith("edufineweb_")]
    assert others == [fineweb.PROGRESS_FILE]
    # the input went through datasets: its json builder cached the file
    assert any("json" in p.name for p in (corpus["tmp"] / "hf_cache").iterdir())


def test_same_bytes_with_two_processes(corpus, tmp_path):
    cli(tmp_path, "--input", corpus["path"], "--output_dir", tmp_path / "out", "--shard_size", SHARD, "--nprocs", 2)
    assert shards(tmp_path / "out") == shards(corpus["ref"])


@pytest.mark.parametrize("streaming", [False, True], ids=["cached", "streaming"])
def test_jsonl_txt_parquet_in_the_order_given(tmp_path, streaming):
    """Files in argument order, each glob sorted; a .txt file is one document. An undecodable .txt is
    skipped under --skip_bad (found at load time without --streaming, while reading with it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(60, seed=1)
    write_jsonl(tmp_path / "c.jsonl", [{"content": d} for d in docs[23:]])
    (tmp_path / "txt").mkdir()
    for name, doc in zip(["b10.txt", "b02.txt", "b2.txt"], docs[20:23]):  # made out of sorted order
        (tmp_path / "txt" / name).write_text(doc + "\nsecond line\n", encoding="utf-8")
    (tmp_path / "txt" / "b05.txt").write_bytes(b"undecodable \xff")
    pq.write_table(pa.table({"id": list(range(20)), "content": docs[:20]}), tmp_path / "a.parquet")
    r = cli(tmp_path, "--input", tmp_path / "c.jsonl", tmp_path / "txt" / "*.txt", tmp_path / "a.parquet",
            "--text_field", "content", "--output_dir", tmp_path / "out", "--shard_size", SHARD, "--skip_bad",
            *(["--streaming"] if streaming else []))
    txt = [docs[i] + "\nsecond line\n" for i in (21, 20, 22)]  # sorted names: b02, b10, b2
    assert shards(tmp_path / "out") == expected_shards(docs[23:] + txt + docs[:20])
    assert f"skipping {tmp_path / 'txt' / 'b05.txt'}: UnicodeDecodeError" in r.stderr
    assert "60 documents" in r.stdout and "skipped 1 unreadable files" in r.stdout
    if not streaming:  # the input went through datasets: its builders cached the files
        assert {"json", "text", "parquet"} <= {p.name for p in (tmp_path / "hf_cache").iterdir()}


def test_tokenize_batch_matches_encode_ordinary():
    enc = get_encoding()
    texts = ["", " ", "hello world", "<|endoftext|>", "a<|endoftext|>b", "lone \ud800 surrogate", *ODD]
    tokens, lengths = fineweb.tokenize_batch(texts)
    want = [t for text in texts for t in [EOT] + enc.encode_ordinary(text)]
    assert tokens.dtype == np.uint16 and tokens.tolist() == want
    assert lengths.tolist() == [1 + len(enc.encode_ordinary(t)) for t in texts]
    with pytest.raises(fineweb.WorkerError, match="^tokenizing failed: "):
        fineweb.tokenize_batch([None])


def test_dataloaderlite_reads_the_shards(corpus):
    try:
        from train_gpt2 import DataLoaderLite
    except ImportError as e:
        pytest.skip(f"train_gpt2.DataLoaderLite not importable: {e}")
    for split, name in [("train", "edufineweb_train_000001.npy"), ("val", "edufineweb_val_000000.npy")]:
        loader = DataLoaderLite(2, 8, process_rank=0, num_processes=1, split=split, data_root=str(corpus["ref"]))
        x, y = loader.next_batch()
        first = np.load(corpus["ref"] / name)[:17].astype(np.int64)
        assert x.shape == y.shape == (2, 8)
        assert x.flatten().tolist() == first[:16].tolist() and y.flatten().tolist() == first[1:].tolist()


# ---------------------------------------------------------------------------------------------- resuming


def test_killed_run_resumes_to_the_same_bytes(corpus, tmp_path):
    """kill -9 while a finished shard is in place but not yet recorded; the re-run ends byte-identical."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "fineweb.py"), "--input", str(corpus["path"]), "--output_dir", str(out),
           "--shard_size", str(SHARD), "--nprocs", "2"]
    proc = subprocess.Popen(cmd, env=env(tmp_path, FINEWEB_SLEEP_AFTER_SHARD="0.4"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while len(shards(out)) < 3:  # shard 2 in place: 2 recorded, the third sleeping before its record
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        recorded = json.loads((out / fineweb.PROGRESS_FILE).read_text())
        assert not recorded["complete"] and 2 <= len(recorded["shards"]) < len(shards(corpus["ref"]))
        assert recorded["shards"][-1]["resume"]["offset"] > 0  # (here every shard ends inside a document)
        for _ in range(50):  # the workers notice their main process is gone and exit
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("worker processes outlived their killed main process")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    r = cli(tmp_path, *cmd[2:])
    assert f"resumed at shard {len(recorded['shards'])}" in r.stdout
    assert shards(out) == shards(corpus["ref"])
    assert not (out / fineweb.TMP_NAME).exists()
    r = cli(tmp_path, *cmd[2:])  # a finished run: nothing to do
    assert "complete already" in r.stdout


def test_resume_at_a_document_boundary_with_skipped_records(tmp_path):
    """Every document is 3 tokens and a shard 6: shards end exactly between documents. Records without
    text in between are skipped and counted the same way by an uninterrupted and a resumed run."""
    records = []
    for i in range(40):
        records.append({"text": "hello world"})
        if i % 7 == 0:
            records.append({"other": i})
    path = write_jsonl(tmp_path / "d.jsonl", records)
    args = ["--input", path, "--output_dir", tmp_path / "out", "--shard_size", 6, "--skip_bad"]
    r = cli(tmp_path, *args)
    assert "40 documents" in r.stdout and "skipped 6 records without text" in r.stdout
    full = shards(tmp_path / "out")
    assert full == expected_shards(["hello world"] * 40, shard_size=6)
    # as if the run had died after shard 3: drop what follows from the record and the disk
    progress_path = tmp_path / "out" / fineweb.PROGRESS_FILE
    progress = json.loads(progress_path.read_text())
    assert progress["shards"][3]["resume"] == {"record": 10, "offset": 0, "documents": 8}  # records 0, 8 bad
    progress["shards"], progress["complete"] = progress["shards"][:4], False
    progress_path.write_text(json.dumps(progress))
    for name in list(full)[4:]:
        (tmp_path / "out" / name).unlink()
    (tmp_path / "out" / fineweb.TMP_NAME).write_bytes(b"half a shard")
    r = cli(tmp_path, *args, "--streaming")  # streaming or not, the same bytes: resuming may switch
    assert "resumed at shard 4" in r.stdout
    assert "40 documents" in r.stdout and "skipped 6 records without text" in r.stdout
    assert shards(tmp_path / "out") == full
    assert not (tmp_path / "out" / fineweb.TMP_NAME).exists()


def test_refuses_to_mix_runs(corpus, tmp_path):
    r = cli(tmp_path, "--input", corpus["path"], "--output_dir", corpus["ref"], "--shard_size", 2 * SHARD, ok=False)
    assert "other settings (--shard_size differs)" in error_line(r)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "edufineweb_train_000001.npy").write_bytes(b"")
    r = cli(tmp_path, "--input", corpus["path"], "--output_dir", tmp_path / "out", ok=False)
    assert "already holds shards this script has no record of" in error_line(r)


# ---------------------------------------------------------------------------------------------- bad input


def test_missing_file_and_empty_glob(tmp_path):
    r = cli(tmp_path, "--input", tmp_path / "nope.jsonl", ok=False)
    assert f"--input file '{tmp_path / 'nope.jsonl'}' does not exist" in error_line(r)
    r = cli(tmp_path, "--input", tmp_path / "*.parquet", ok=False)
    assert "matched no files; check the path" in error_line(r)
    (tmp_path / "data.csv").write_text("text\nhello\n")
    r = cli(tmp_path, "--input", tmp_path / "data.csv", ok=False)
    assert "unknown file type" in error_line(r)
    r = cli(tmp_path, "--input", tmp_path / "data.csv", "--dataset", "x", ok=False)
    assert r.returncode == 2 and "--dataset choose a Hugging Face data set: not for use with --input" in r.stderr


def test_record_without_text_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "one"}, {"text": "two"}, {"body": "three"}, {"text": "four"}])
    line = error_line(cli(tmp_path, "--input", path, "--output_dir", tmp_path / "out", ok=False))
    assert f"{path}: record 3 has no 'text' field (the fields: text, body)" in line and "--skip_bad" in line
    assert not shards(tmp_path / "out")  # no partial shard
    # (--skip_bad on such records: test_resume_at_a_document_boundary_with_skipped_records)


def test_undecodable_bytes(tmp_path):
    (tmp_path / "a.txt").write_text("fine text", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"bad \xff byte")
    line = error_line(cli(tmp_path, "--input", tmp_path / "*.txt", "--output_dir", tmp_path / "out", ok=False))
    assert f"cannot read {tmp_path / 'b.txt'}: UnicodeDecodeError" in line and "--skip_bad" in line
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "bad \xff"}\n')
    line = error_line(cli(tmp_path, "--input", tmp_path / "d.jsonl", "--output_dir", tmp_path / "out", ok=False))
    assert f"cannot read {tmp_path / 'd.jsonl'}: UnicodeDecodeError" in line
    assert not (tmp_path / "out").exists()
    # (--skip_bad on undecodable files: test_jsonl_txt_parquet_in_the_order_given)


def test_empty_input(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    r = cli(tmp_path, "--input", tmp_path / "empty.jsonl", "--output_dir", tmp_path / "out", ok=False)
    assert "empty.jsonl is empty; it adds no documents" in r.stderr
    assert error_line(r) == "fineweb.py: error: the input holds no documents; nothing to write"
    write_jsonl(tmp_path / "d.jsonl", [{"body": "x"}, {"body": "y"}])  # records, not one with text
    r = cli(tmp_path, "--input", tmp_path / "d.jsonl", "--output_dir", tmp_path / "out", "--skip_bad", ok=False)
    assert "the input holds no documents with text" in error_line(r)
    assert not (tmp_path / "out").exists()


def test_hub_unreachable_is_one_line(tmp_path):
    """The default (the lecture's data set) without internet: one line saying what to do."""
    r = cli(tmp_path, "--output_dir", tmp_path / "out", ok=False)
    line = error_line(r)
    assert "could not load HuggingFaceFW/fineweb-edu (sample-10BT, train)" in line and "--input" in line


def test_benchmark_runs_and_compares(corpus, tmp_path):
    write_jsonl(tmp_path / "small.jsonl", [{"text": d} for d in corpus["docs"][:50]])
    r = cli(tmp_path, "--benchmark", "--input", tmp_path / "small.jsonl", "--shard_size", SHARD, "--nprocs", 2)
    assert "lecture" in r.stdout and "speed-up" in r.stdout and "byte-identical: yes" in r.stdout
