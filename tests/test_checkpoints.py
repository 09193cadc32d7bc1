"""Checkpoints: exact resume after SIGKILL, torchrun restarts, safe loading, fine-tuning, sampling, export."""
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import REPO, TINY, env_for_tests, read_log, run_script
from test_ddp import torchrun

LONG = [*TINY, "--max_steps", "40", "--checkpoint_interval", "8", "--eval_interval", "8"]


def train_lines(log_dir):
    return {k: v for k, v in read_log(Path(log_dir) / "log.txt").items() if k[1] == "train"}


def wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, "the run ended before the file appeared"
        assert time.time() - t0 < timeout, f"{path} did not appear"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An undisturbed 40-step run, the yardstick for the resumed ones."""
    d = tmp_path_factory.mktemp("reference")
    r = run_script("train_gpt2.py", *LONG, "--log_dir", d / "log", cwd=d)
    assert r.returncode == 0, r.stderr
    return d / "log"


def test_resume_after_sigkill_is_bit_exact(tmp_path, reference):
    log_dir = tmp_path / "log"
    cmd = [sys.executable, str(REPO / "train_gpt2.py"), *LONG, "--log_dir", str(log_dir)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env_for_tests(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(log_dir / "model_00008.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = (log_dir / "log.txt").read_text()
    assert "7 train" in before and "40 val" not in before  # killed mid-run
    r = run_script("train_gpt2.py", *LONG, "--log_dir", log_dir, "--resume", "auto", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    after = (log_dir / "log.txt").read_text()
    assert after.startswith(before)  # appended to, never truncated
    assert train_lines(log_dir) == train_lines(reference)  # the same loss strings, bit for bit
    assert len(train_lines(log_dir)) == 40


def test_checkpoint_holds_plain_weights_optimizer_loader_and_rng(reference):
    ckpt = torch.load(reference / "model_00040.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 40 and ckpt["config"]["n_layer"] == 2
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    assert ckpt["optimizer"]["state"]  # AdamW moments
    assert ckpt["train_loader"][0]["current_position"] >= 0
    assert "torch" in ckpt["rng"][0]
    assert isinstance(ckpt["val_loss"], float)
    assert not list(reference.glob("*.tmp"))  # written under a temporary name, then renamed


def test_resume_with_a_different_model_shape_is_a_clear_error(tmp_path, reference):
    r = run_script("train_gpt2.py", *LONG, "--n_layer", "3", "--log_dir", tmp_path / "log",
                   "--resume", reference / "model_00008.pt", cwd=tmp_path)
    assert r.returncode == 1
    assert "n_layer=2" in r.stderr and "n_layer=3" in r.stderr and r.stderr.count("\n") == 1


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = None


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_malicious_checkpoint_runs_no_code(tmp_path, how):
    global MARKER
    MARKER = tmp_path / "pwned"
    evil = tmp_path / "model_00008.pt"
    if how == "torch.save":
        torch.save({"model": Evil(), "config": {}}, evil)
    else:
        evil.write_bytes(pickle.dumps({"model": Evil()}))
    for args in (["--resume", evil], ["--init_from", evil, "--sample", "Hi"], ["--init_from", evil, "--export_hf", tmp_path / "x"]):
        r = run_script("train_gpt2.py", *TINY, "--log_dir", tmp_path / "log", *args, cwd=tmp_path)
        assert r.returncode == 1 and "cannot load checkpoint" in r.stderr, r.stderr
        assert not MARKER.exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    r = run_script("train_gpt2.py", *TINY, "--warmup_steps", "0", "--max_lr", "1e4", "--min_lr", "1e4",
                   "--max_steps", "20", "--checkpoint_interval", "1", "--log_dir", tmp_path / "log", cwd=tmp_path)
    assert r.returncode == 1
    line = r.stderr.strip().splitlines()[-1]
    assert "step 1:" in line and "stopping" in line and "model_00001.pt" in line
    ckpt = torch.load(tmp_path / "log" / "model_00001.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (tmp_path / "log" / "model_00002.pt").exists()


def killed_rank_pid(torchrun_proc, rank):
    """The pid of the worker with RANK=rank among torchrun's children."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == torchrun_proc.pid and f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


def test_torchrun_restarts_after_a_killed_rank_and_finishes_like_an_undisturbed_run(tmp_path):
    flags = [*LONG, "--resume", "auto"]
    calm = torchrun(2, *flags, "--log_dir", tmp_path / "calm", cwd=tmp_path)
    assert calm.returncode == 0, calm.stderr[-2000:]
    log_dir = tmp_path / "faulty"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           str(REPO / "train_gpt2.py"), *flags, "--log_dir", str(log_dir)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env_for_tests(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    wait_for(log_dir / "model_00008.pt", proc)
    pid = killed_rank_pid(proc, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in out
    calm_lines, faulty_lines = train_lines(tmp_path / "calm"), train_lines(log_dir)
    assert faulty_lines == calm_lines and len(calm_lines) == 40


def small_hf_dir(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2))
    with torch.no_grad():  # weights far from a fresh init, so only a faithful copy gives transformers' loss
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_finetune_from_a_local_transformers_model(tmp_path):
    from gpt2_tokenizer import get_encoding
    hf_dir = small_hf_dir(tmp_path)
    r = run_script("train_gpt2.py", "--init_from", hf_dir, "--block_size", "32", "--T", "32", "--B", "2",
                   "--val_steps", "2", "--total_batch_size", "64", "--device", "cpu", "--max_steps", "3",
                   "--log_dir", tmp_path / "log", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / "log" / "model_00003.pt", weights_only=True)
    assert ckpt["config"] == {"block_size": 32, "vocab_size": 50257, "n_layer": 2, "n_head": 2, "n_embd": 32}
    # step 0's val loss is transformers' own loss on the same two val batches: the weights came across intact
    tokens = get_encoding().encode_ordinary((REPO / "input.txt").read_text(encoding="utf-8"))
    val = torch.tensor(tokens[int(0.9 * len(tokens)):], dtype=torch.long)
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    losses = []
    with torch.no_grad():
        for start in (0, 64):  # B*T = 64 tokens a batch
            buf = val[start:start + 65]
            x, y = buf[:-1].view(2, 32), buf[1:].view(2, 32)
            logits = hf(x).logits
            losses.append(torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).item())
    expected = sum(losses) / 2
    assert abs(expected - 10.83) > 0.5  # far from a uniform guess, so the check can tell
    assert float(read_log(tmp_path / "log" / "log.txt")[(0, "val")]) == pytest.approx(expected, abs=2e-4)


def test_sampling_is_reproducible_for_a_seed(reference, tmp_path):
    ckpt = reference / "model_00040.pt"
    runs = [run_script("train_gpt2.py", "--init_from", ckpt, "--sample", "Hello, I'm a language model,",
                       "--num_samples", "2", "--max_new_tokens", "12", "--seed", seed, "--device", "cpu", cwd=tmp_path)
            for seed in ("7", "7", "8")]
    for r in runs:
        assert r.returncode == 0, r.stderr
    samples = [[l for l in r.stdout.splitlines() if l.startswith("sample ")] for r in runs]
    assert len(samples[0]) == 2 and all(s.startswith("sample 0: Hello, I'm a language model,") for s in samples[0][:1])
    assert samples[0] == samples[1]
    assert samples[0] != samples[2]


def test_export_loads_in_transformers_with_the_same_logits(reference, tmp_path):
    from train_gpt2 import GPT
    out = tmp_path / "exported"
    r = run_script("train_gpt2.py", "--init_from", reference / "model_00040.pt", "--export_hf", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    ours = GPT.from_pretrained(str(reference / "model_00040.pt")).eval()
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)[0]).abs().max().item() <= 1e-4
