"""train_gpt2.py as a user runs it: the smoke run, the preset, the offline tokenizer, one-line errors."""
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, TINY, env_for_tests, read_log, run_script


def test_import_starts_nothing(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import train_gpt2"], cwd=tmp_path, capture_output=True, text=True,
                       env=env_for_tests(PYTHONPATH=str(REPO)))
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    assert list(tmp_path.iterdir()) == []


def test_smoke_run_on_input_txt(tmp_path):
    r = run_script("train_gpt2.py", *TINY, "--max_lr", "1e-2", "--max_steps", "8", "--eval_interval", "4",
                   "--log_dir", tmp_path / "log", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "preset: shakespeare-cpu" in r.stdout
    assert "using" in r.stdout and "input.txt" in r.stdout  # says it fell back to input.txt
    assert "n_layer=2" in r.stdout  # flags override the preset
    log = read_log(tmp_path / "log" / "log.txt")
    train = [float(log[(s, "train")]) for s in range(8)]
    assert train[0] == pytest.approx(np.log(50304), abs=0.3)  # a fresh model is about uniform over the vocab
    assert train[-1] < train[0] - 0.5  # and learns
    assert {(0, "val"), (4, "val"), (8, "val")} <= set(log)
    assert (tmp_path / "log" / "model_00008.pt").exists()
    assert "sample 0: Hello, I'm a language model," in r.stdout


def test_tokenizer_works_offline_from_an_empty_cache(tmp_path):
    code = ("from gpt2_tokenizer import get_encoding; print(get_encoding().encode(\"Hello, I'm a language model,\"))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env=env_for_tests(TIKTOKEN_CACHE_DIR=str(tmp_path / "cache")))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[15496, 11, 314, 1101, 257, 3303, 2746, 11]"
    # tiktoken's own cache now holds the two files under the sha1 of their URLs
    url = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
    assert (tmp_path / "cache" / hashlib.sha1(url.encode()).hexdigest()).exists()


def bad_shard_dir(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    np.save(d / "edufineweb_val_000000.npy", np.arange(5000, dtype=np.uint16))
    np.save(d / "edufineweb_train_000001.npy", np.arange(5000, dtype=np.uint16))
    f = d / "edufineweb_train_000001.npy"
    f.write_bytes(f.read_bytes()[:3000])
    return d


BAD_INPUTS = {
    "batch does not divide": (["--total_batch_size", "100"], "is not divisible by B*T*world_size"),
    "T above block size": (["--T", "32"], "longer than --block_size"),
    "heads do not divide width": (["--n_head", "3"], "not divisible by --n_head"),
    "missing data": (["--data", "no/such/dir"], "does not exist"),
    "truncated shard": (["--data", "SHARDS"], "is truncated"),
    "bad checkpoint": (["--resume", "GARBAGE"], "cannot load checkpoint"),
    "missing checkpoint": (["--resume", "no_such.pt"], "no such file"),
    "no cuda": (["--device", "cuda"], "no CUDA device"),
    "negative steps": (["--max_steps", "-3"], "must be positive"),
}


def without_device(flags):
    i = flags.index("--device")
    return flags[:i] + flags[i + 2:]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_error(tmp_path, case):
    flags, message = BAD_INPUTS[case]
    if case == "no cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    stand_ins = {"SHARDS": lambda: str(bad_shard_dir(tmp_path)), "GARBAGE": lambda: str(garbage)}
    flags = [stand_ins[f]() if f in stand_ins else f for f in flags]
    base = without_device(TINY) if case == "no cuda" else TINY
    if "--max_steps" not in flags:
        flags += ["--max_steps", "2"]
    r = run_script("train_gpt2.py", *base, *flags, "--log_dir", tmp_path / "log", cwd=tmp_path)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("train_gpt2.py: error: ") and message in lines[0], lines[0]
    assert not (tmp_path / "log" / "log.txt").exists()


def test_tokenizer_replaces_a_corrupt_cache_file(tmp_path):
    url = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"half a file")
    code = "from gpt2_tokenizer import get_encoding; print(get_encoding().encode('hello world'))"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env=env_for_tests(TIKTOKEN_CACHE_DIR=str(tmp_path / "cache")))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[31373, 995]"


def test_a_new_run_moves_the_earlier_run_aside(tmp_path):
    log_dir = tmp_path / "log"
    first = run_script("train_gpt2.py", *TINY, "--max_steps", "2", "--log_dir", log_dir, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    first_log = (log_dir / "log.txt").read_text()
    second = run_script("train_gpt2.py", *TINY, "--max_steps", "3", "--log_dir", log_dir, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    moved = list(log_dir.glob("previous-*"))
    assert len(moved) == 1 and "moved its log.txt and checkpoints" in second.stdout
    assert (moved[0] / "log.txt").read_text() == first_log
    assert (moved[0] / "model_00002.pt").exists()
    assert "2 train" in (log_dir / "log.txt").read_text() and (log_dir / "model_00003.pt").exists()


def first_cuda_call(tmp_path, env=()):
    """train_gpt2.main with torch.cuda saying a GPU is there, up to its first CUDA call (set_device, which ends the
    run): the calls made before it, and set_device's argument."""
    script = f"""
import json, os, sys, torch, torch.distributed as dist
sys.path.insert(0, {str(REPO)!r})
calls = []
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 2
dist.init_process_group = lambda backend, **kw: calls.append(["init_process_group", backend])
def set_device(device):
    calls.append(["set_device", str(device)])
    print("CALLS " + json.dumps(calls), flush=True)
    os._exit(0)
torch.cuda.set_device = set_device
import train_gpt2
train_gpt2.main({[a for a in TINY if a not in ("--device", "cpu")] + ["--log_dir", "log"]!r})
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=env_for_tests(**dict(env)))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.split("CALLS ")[1])


def test_one_gpu_start_up_sets_an_indexed_device(tmp_path):
    assert first_cuda_call(tmp_path) == [["set_device", "cuda:0"]]


def test_torchrun_start_up_sets_the_local_ranks_device(tmp_path):
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    assert first_cuda_call(tmp_path, env) == [["init_process_group", "nccl"], ["set_device", "cuda:1"]]
