"""fineweb.py end to end: the real command line on small corpora written here.

The expected shards are computed independently: tiktoken's encode_ordinary on each document, [EOT] before each, the
stream cut every --shard_size tokens, each piece np.save'd (the lecture's recipe).
"""
import io
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import fineweb
from conftest import REPO, env_for_tests, kill_group, run_script
from gpt2_tokenizer import EOT, get_encoding

SHARD = 1000  # tokens per shard in these tests
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but "
         "have an they you were her she there one all we their learning school river energy cell").split()
ODD = ["naïve café", "日本語のテキスト", "emoji 🙂🚀", "<|endoftext|> stays text", "  spaces   and\n\nlines\n",
       "tab\there", "'single' \"double\"", "3.14159 and 12,345", "\u00a0nbsp", "x" * 300]


def make_docs(n, seed, words=(0, 120)):
    """n documents of 0..120 words, some with unusual characters; document 3 is empty."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        doc = [rng.choice(WORDS) for _ in range(rng.randint(*words))]
        if rng.random() < 0.3:
            doc.insert(rng.randint(0, len(doc)), rng.choice(ODD))
        docs.append(" ".join(doc))
    docs[3] = ""  # an empty document is still an <|endoftext|>
    return docs


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
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
    paths = sorted(out_dir.glob("edufineweb_*.npy"), key=lambda p: p.name.split("_")[-1])
    return {p.name: p.read_bytes() for p in paths}


def cli(tmp, *args, ok=True):
    r = run_script("fineweb.py", *args, env=env_for_tests(HF_DATASETS_CACHE=tmp / "hf_cache"), timeout=120)
    if ok:
        assert r.returncode == 0, r.stderr
    return r


def error_line(r):
    """The run failed with one line that says why, last on stderr (after the progress bar, if any)."""
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("fineweb.py: error: ") and "Traceback" not in r.stderr, r.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """300 documents in a .jsonl (with other fields, as FineWeb-Edu has), and a reference run of it."""
    tmp = tmp_path_factory.mktemp("corpus")
    docs = make_docs(300, seed=0)
    path = write_jsonl(tmp / "docs.jsonl", [{"id": i, "text": d, "score": 3.5} for i, d in enumerate(docs)])
    r = cli(tmp, "--input", path, "--output_dir", tmp / "ref", "--shard_size", SHARD, "--nprocs", 1)
    return {"tmp": tmp, "docs": docs, "path": path, "ref": tmp / "ref", "stdout": r.stdout}


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """A corpus of ~2.5 MB: more than two worker tasks of text."""
    tmp = tmp_path_factory.mktemp("large")
    docs = make_docs(4000, seed=3, words=(50, 250))
    path = write_jsonl(tmp / "large.jsonl", [{"text": d} for d in docs])
    assert path.stat().st_size > 2 * fineweb.TASK_CHARS
    return tmp, path, docs


# ---------------------------------------------------------------------------------------------- output


def test_shards_are_the_lectures_bytes(corpus):
    got, want = shards(corpus["ref"]), expected_shards(corpus["docs"])
    assert list(got)[:2] == ["edufineweb_val_000000.npy", "edufineweb_train_000001.npy"]
    assert got == want  # val first, then train, numbered from 0; the last holds the remainder
    assert len(got) > 10
    n = sum(len(np.load(corpus["ref"] / name)) for name in got)
    assert f"300 documents, {n:,} tokens: val 1,000 (shard 0), train {n - 1000:,} ({len(got) - 1} shards)" in \
        corpus["stdout"]
    others = [p.name for p in corpus["ref"].iterdir() if not p.name.startswith("edufineweb_")]
    assert others == [fineweb.PROGRESS_FILE]  # nothing a loader picking names with "train"/"val" could take


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_two_worker_processes_give_the_bytes_of_one(large, start_method):
    tmp, path, docs = large
    one = tmp / "one"
    if not one.exists():
        cli(tmp, "--input", path, "--output_dir", one, "--shard_size", 50_000, "--nprocs", 1)
        assert shards(one) == expected_shards(docs, 50_000)
    out = tmp / start_method
    code = (f"import multiprocessing, sys; multiprocessing.set_start_method({start_method!r}); "
            f"sys.path.insert(0, {str(REPO)!r}); import fineweb; "
            f"fineweb.main(['--input', {str(path)!r}, '--output_dir', {str(out)!r}, '--shard_size', '50000', "
            f"'--nprocs', '2'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_for_tests(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert shards(out) == shards(one)


@pytest.mark.parametrize("streaming", [False, True], ids=["cached", "streaming"])
def test_jsonl_txt_parquet_in_the_order_given(tmp_path, streaming):
    """Files in argument order, each glob sorted; a .txt file is one document; an undecodable .txt is skipped under
    --skip_bad and counted."""
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
    first_bad = f"{tmp_path / 'txt' / 'b05.txt'}: cannot read it (UnicodeDecodeError"
    assert "60 documents" in r.stdout and f"skipped 1 bad records (the first: {first_bad}" in r.stdout


def test_skip_bad_drops_only_the_bad_lines(tmp_path):
    docs = make_docs(30, seed=2)
    lines = [json.dumps({"text": d}).encode() for d in docs]
    lines[5:5] = [b'{"text": "cut off', b'{"text": "caf\xe9"}', b'{"body": "no text field"}']  # lines 6, 7 and 8
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    r = cli(tmp_path, "--input", tmp_path / "d.jsonl", "--output_dir", tmp_path / "out", "--shard_size", 500,
            "--skip_bad")
    assert shards(tmp_path / "out") == expected_shards(docs, 500)  # every good line, the rest of the file too
    assert f"skipped 3 bad records (the first: {tmp_path / 'd.jsonl'} line 6: not a JSON record (JSONDecodeError" \
           in r.stdout
    r = cli(tmp_path, "--input", tmp_path / "d.jsonl", "--output_dir", tmp_path / "strict", ok=False)
    assert f"{tmp_path / 'd.jsonl'} line 6: not a JSON record (JSONDecodeError" in error_line(r)
    assert "--skip_bad" in error_line(r) and not shards(tmp_path / "strict")


def test_tokenize_matches_encode_ordinary():
    enc = get_encoding()
    texts = ["", " ", "hello world", "<|endoftext|>", "a<|endoftext|>b", "lone \ud800 surrogate", *ODD]
    tokens, lengths = fineweb.tokenize(texts)
    assert tokens.dtype == np.uint16 and tokens.tolist() == [t for x in texts for t in [EOT] + enc.encode_ordinary(x)]
    assert lengths.tolist() == [1 + len(enc.encode_ordinary(t)) for t in texts]


def test_dataloaderlite_reads_the_shards(corpus):
    from train_gpt2 import DataLoaderLite
    for split, name in [("train", "edufineweb_train_000001.npy"), ("val", "edufineweb_val_000000.npy")]:
        x, y = DataLoaderLite(2, 8, split=split, data_root=str(corpus["ref"])).next_batch()
        first = np.load(corpus["ref"] / name)[:17].astype(np.int64)
        assert x.flatten().tolist() == first[:16].tolist() and y.flatten().tolist() == first[1:].tolist()


def test_a_small_input_becomes_ten_shards_that_train_gpt2_trains_on(tmp_path):
    r = cli(tmp_path, "--input", REPO / "input.txt", "--output_dir", tmp_path / "own")
    got = shards(tmp_path / "own")
    assert list(got)[0] == "edufineweb_val_000000.npy" and len(got) == 10  # 1 val, 9 train
    tokens = 1 + len(get_encoding().encode_ordinary((REPO / "input.txt").read_text(encoding="utf-8")))
    assert f"1 documents, {tokens:,} tokens: val {-(-tokens // 10):,} (shard 0)" in r.stdout
    assert "(9 shards)" in r.stdout
    r = run_script("train_gpt2.py", "--data", tmp_path / "own", "--max_steps", "1", "--val_steps", "1", "--log_dir",
                   tmp_path / "log", cwd=tmp_path)  # (the preset's flags otherwise: B and T of the CPU preset)
    assert r.returncode == 0, r.stderr
    assert "0 val" in (tmp_path / "log" / "log.txt").read_text()
    r = cli(tmp_path, "--input", REPO / "input.txt", "--output_dir", tmp_path / "one", "--shard_size", 1e6, ok=False)
    assert "fit in one --shard_size 1,000,000: no train shard; give a smaller --shard_size" in error_line(r)


# ---------------------------------------------------------------------------------------------- resuming


def test_killed_run_resumes_to_the_same_bytes(large, tmp_path):
    """kill -9 once the progress file records a few shards; the re-run ends byte-identical."""
    _, path, docs = large
    out = tmp_path / "out"
    args = ["--input", str(path), "--output_dir", str(out), "--shard_size", "2000", "--nprocs", "2"]
    proc = subprocess.Popen([sys.executable, str(REPO / "fineweb.py"), *args], env=env_for_tests(),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, progress = time.time() + 60, out / fineweb.PROGRESS_FILE
        while not (progress.exists() and json.loads(progress.read_text())["shards"]):  # aimed at: a shard recorded
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGSTOP)
        recorded = json.loads((out / fineweb.PROGRESS_FILE).read_text())
        assert not recorded["complete"] and len(recorded["shards"]) >= 1  # stopped mid-run
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for _ in range(50):  # the workers notice their main process is gone, and exit
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("worker processes outlived their killed main process")
    finally:
        kill_group(proc)
    r = cli(tmp_path, *args)
    assert f"resumed after shard {len(recorded['shards']) - 1}" in r.stdout
    assert shards(out) == expected_shards(docs, 2000)
    assert not list(out.glob("*.tmp"))
    assert "complete already" in cli(tmp_path, *args).stdout  # a finished run: nothing to do


def test_resume_at_a_document_boundary_with_skipped_records(tmp_path):
    """Every document is 3 tokens and a shard 6: shards end exactly between documents. Records without text in
    between are skipped and counted the same way by an uninterrupted and a resumed run."""
    records = []
    for i in range(40):
        records.append({"text": "hello world"})
        if i % 7 == 0:
            records.append({"other": i})
    path = write_jsonl(tmp_path / "d.jsonl", records)
    args = ["--input", path, "--output_dir", tmp_path / "out", "--shard_size", 6, "--skip_bad"]
    r = cli(tmp_path, *args)
    assert "40 documents" in r.stdout and "skipped 6 bad records" in r.stdout
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
    (tmp_path / "out" / "edufineweb_train_000004.npy.1234.tmp").write_bytes(b"half a shard")
    r = cli(tmp_path, *args)
    assert "resumed after shard 3" in r.stdout and "40 documents" in r.stdout and "skipped 6 bad records" in r.stdout
    assert shards(tmp_path / "out") == full and not list((tmp_path / "out").glob("*.tmp"))


def test_refuses_to_mix_runs(corpus, tmp_path):
    r = cli(tmp_path, "--input", corpus["path"], "--output_dir", corpus["ref"], "--shard_size", 2 * SHARD, ok=False)
    assert "holds shards made with another shard_size" in error_line(r)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "edufineweb_train_000001.npy").write_bytes(b"")
    r = cli(tmp_path, "--input", corpus["path"], "--output_dir", tmp_path / "out", ok=False)
    assert "already holds shards this script has no record of" in error_line(r)


# ---------------------------------------------------------------------------------------------- bad input


def test_missing_file_and_empty_glob(tmp_path):
    out = ["--output_dir", tmp_path / "out"]  # (never the repository's edu_fineweb10B/)
    r = cli(tmp_path, "--input", tmp_path / "nope.jsonl", *out, ok=False)
    assert f"--input '{tmp_path / 'nope.jsonl'}' matches no file; check the path" in error_line(r)
    r = cli(tmp_path, "--input", tmp_path / "*.parquet", *out, ok=False)
    assert "matches no file; check the path" in error_line(r)
    r = cli(tmp_path, "--input", tmp_path, *out, ok=False)
    assert "is a directory; name its files" in error_line(r)
    r = cli(tmp_path, "--input", tmp_path / "x.jsonl", "--dataset", "x", *out, ok=False)
    assert r.returncode == 1 and "--dataset and --name choose a Hugging Face data set" in error_line(r)


def test_record_without_text_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "one"}, {"text": "two"}, {"body": "three"}, {"text": "four"}])
    line = error_line(cli(tmp_path, "--input", path, "--output_dir", tmp_path / "out", ok=False))
    assert f"{path} line 3: has no 'text' text (see --text_field)" in line and "--skip_bad" in line
    assert not shards(tmp_path / "out")  # no partial shard


def test_undecodable_text_file(tmp_path):
    (tmp_path / "a.txt").write_text("fine text", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"bad \xff byte")
    line = error_line(cli(tmp_path, "--input", tmp_path / "*.txt", "--output_dir", tmp_path / "out", ok=False))
    assert f"{tmp_path / 'b.txt'}: cannot read it (UnicodeDecodeError" in line and "--skip_bad" in line


def test_empty_input(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    r = cli(tmp_path, "--input", tmp_path / "empty.jsonl", "--output_dir", tmp_path / "out", ok=False)
    assert error_line(r) == "fineweb.py: error: the input holds no documents; nothing to write"
    write_jsonl(tmp_path / "d.jsonl", [{"body": "x"}, {"body": "y"}])  # records, not one with text
    r = cli(tmp_path, "--input", tmp_path / "d.jsonl", "--output_dir", tmp_path / "out", "--skip_bad", ok=False)
    assert "the input holds no documents with text" in error_line(r)


def test_a_read_only_output_directory_fails_before_any_work(tmp_path, read_only_dir):
    r = cli(tmp_path, "--input", REPO / "input.txt", "--output_dir", read_only_dir / "shards", ok=False)
    assert f"cannot write to --output_dir {read_only_dir / 'shards'} (" in error_line(r)
    assert "tokens" not in r.stderr  # (no progress bar: nothing was read or tokenized)


def test_hub_unreachable_is_one_line(tmp_path):
    """The default (the lecture's data set) without internet: one line saying what to do."""
    line = error_line(cli(tmp_path, "--output_dir", tmp_path / "out", ok=False))
    assert "could not read HuggingFaceFW/fineweb-edu" in line and "offline, give local files with --input" in line
