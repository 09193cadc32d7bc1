"""Low-rank adapters (--lora_rank): the base's loss at step 0, only the adapters trained (and held with gradients and
AdamW state), one process, accumulation and DDP alike, exact resume, and a checkpoint every reader takes merged.
The runs fine-tune a GPT-2 far from any training on conversations: they share the conversation issue's loss (the mean
over the step's reply tokens, across micro steps and ranks)."""
import json
import signal
import sys

import pytest
import torch
from transformers import GPT2LMHeadModel

from conftest import REPO, far_gpt2, finish, made_once, read_log, run_main, start, torchrun, wait_for_line, \
    write_chats
from gpt2_tokenizer import get_encoding
from train_gpt2 import GPT, LoRALinear, load_checkpoint, load_weights

# a step of 8 rows of 64 tokens: in one micro step (B=8), in two (B=4), or on two ranks (B=4 each)
LORA = ["--lora_rank", "4", "--T", "64", "--total_batch_size", "512", "--device", "cpu", "--hellaswag", "0",
        "--val_steps", "2", "--max_lr", "3e-3", "--warmup_steps", "2", "--max_steps", "6", "--eval_interval", "3",
        "--checkpoint_interval", "3"]


@pytest.fixture(scope="session")
def lora_runs(tmp_path_factory):
    """{"one": B=8, "accumulated": B=4 with activation checkpointing, "ddp": 2 ranks of B=4}: the log directories of
    three LoRA runs from one base (a transformers directory) on 240 conversations, and "base", "data"."""
    def make(d):
        base, data = far_gpt2(d / "base"), write_chats(d / "chats.jsonl", 240)
        flags = [*LORA, "--init_from", base, "--data", data]
        runs = [run_main(None, d, *flags, "--B", "8", "--log_dir", d / "one"),
                run_main(None, d, *flags, "--B", "4", "--activation_checkpointing", "1", "--log_dir",
                         d / "accumulated"),
                torchrun(2, *flags, "--B", "4", "--log_dir", d / "ddp", cwd=d)]
        failed = [r for r in runs if r.returncode]
        return failed[0] if failed else runs[0]
    log, r = made_once(tmp_path_factory, "lora", make)
    assert r.returncode == 0, r.stderr[-3000:]
    d = log.parent
    return {name: d / name for name in ("one", "accumulated", "ddp", "base")} | {"data": d / "chats.jsonl",
                                                                                   "stdout": r.stdout}


def test_adapters_start_at_zero_so_the_model_starts_as_the_base(tmp_path):
    base = GPT.from_pretrained(str(far_gpt2(tmp_path / "base")))
    lora = GPT.from_pretrained(str(tmp_path / "base"))
    lora.add_lora(4, 16.0)
    x = torch.randint(0, 50257, (2, 64))
    with torch.no_grad():
        assert torch.equal(lora(x)[0], base(x)[0])
    trained = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert len(trained) == 2 * 4 * 2 and all(n.endswith(("lora_A", "lora_B")) for n in trained)  # 4 Linears a block
    assert sum(isinstance(m, LoRALinear) for m in lora.modules()) == 8


def test_a_lora_run_starts_at_the_bases_val_loss_and_trains_the_adapters_alone(lora_runs, tmp_path, capsys):
    r = run_main(capsys, tmp_path, "--eval_only", "--init_from", lora_runs["base"], "--data", lora_runs["data"],
                 "--B", "8", "--T", "64", "--val_steps", "2")
    assert r.returncode == 0, r.stderr
    log = read_log(lora_runs["one"] / "log.txt")
    assert log[(0, "val")] == f"{json.loads(r.stdout.splitlines()[-1])['val_loss']:.4f}"  # step 0: the base's
    assert float(log[(5, "train")]) < float(log[(0, "train")]) - 0.5
    ckpt = load_checkpoint(lora_runs["one"] / "model_00006.pt", resume=True)  # (unmerged)
    base = load_weights(str(lora_runs["base"]))["model"]
    assert all(torch.equal(ckpt["model"][k], v) for k, v in base.items())  # every frozen tensor, bit for bit
    adapters = [k for k in ckpt["model"] if k.endswith(("lora_A", "lora_B"))]
    assert len(adapters) == 16 and all(ckpt["model"][k].abs().sum() > 0 for k in adapters)
    assert len(ckpt["optimizer"]["state"]) == 16  # AdamW's moments: the adapters' alone
    frozen = sum(v.numel() for v in base.values()) - 50257 * 32  # (wte and lm_head: one tensor)
    state = 4 * frozen + 16 * sum(ckpt["model"][k].numel() for k in adapters)  # no gradient, no moments for the rest
    out = lora_runs["stdout"]  # (the run of B=8's)
    assert float(out.split("state per rank: ")[1].split(" GiB")[0]) == pytest.approx(state / 2**30, rel=1e-3)


def test_one_process_accumulation_and_ddp_give_the_same_losses(lora_runs):
    """The loss of a step is the mean over its reply tokens, however B, micro steps and ranks split its rows."""
    one, accumulated, ddp = (read_log(lora_runs[name] / "log.txt") for name in ("one", "accumulated", "ddp"))
    assert sorted(one) == sorted(accumulated) == sorted(ddp) and len(one) == 6 + 3
    for key, value in one.items():  # (val losses are logged to 4 decimals, train losses to 6)
        tolerance = 1.5e-4 if key[1] == "val" else 1e-5
        assert float(accumulated[key]) == pytest.approx(float(value), abs=tolerance), key
        assert float(ddp[key]) == pytest.approx(float(value), abs=tolerance), key


def test_every_reader_takes_a_lora_checkpoint_merged(lora_runs, tmp_path, capsys):
    ckpt = lora_runs["one"] / "model_00006.pt"
    unmerged = GPT.from_pretrained(str(ckpt), load_checkpoint(ckpt, resume=True)).eval()
    merged = GPT.from_pretrained(str(ckpt)).eval()
    assert unmerged.lora and not merged.lora
    r = run_main(capsys, tmp_path, "--init_from", ckpt, "--export_hf", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 50257, (2, 64))
    with torch.no_grad():
        logits = unmerged(x)[0]
        assert (merged(x)[0] - logits).abs().max() < 1e-5 and (hf(x).logits - logits).abs().max() < 1e-5
        ids = torch.tensor([get_encoding().encode("Hello, I'm a language model,")])
        greedy = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=50256)[0].tolist()
    assert unmerged.generate(ids, 16, top_k=1)[0].tolist() == greedy
    r = run_main(capsys, tmp_path, "--init_from", ckpt, "--sample", "Hello, I'm a language model,", "--num_samples",
                 "1", "--top_k", "1", "--max_new_tokens", "8")
    assert r.returncode == 0 and r.stdout.splitlines()[1] == get_encoding().decode(greedy), r.stdout
    r = run_main(capsys, tmp_path, "--eval_only", "--init_from", ckpt, "--data", lora_runs["data"])  # (its B, T)
    assert r.returncode == 0, r.stderr
    assert f"{json.loads(r.stdout.splitlines()[-1])['val_loss']:.4f}" == read_log(lora_runs["one"] / "log.txt")[
        (6, "val")]


def test_a_lora_run_stopped_by_sigterm_resumes_exactly(lora_runs, tmp_path, capsys):
    flags = [*LORA, "--init_from", lora_runs["base"], "--data", lora_runs["data"], "--B", "8", "--log_dir", "log"]
    proc = start([sys.executable, str(REPO / "train_gpt2.py"), *flags, "--checkpoint_interval", "100"], cwd=tmp_path)
    wait_for_line(proc, "step     1 | loss")
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    r = run_main(capsys, tmp_path, "--resume", "auto")  # (the checkpoint's flags)
    assert r.returncode == 0, r.stderr
    whole = read_log(lora_runs["one"] / "log.txt")
    assert read_log(tmp_path / "log" / "log.txt") == whole  # every loss, to the printed digits
    a, b = (torch.load(d / "model_00006.pt", weights_only=True) for d in (lora_runs["one"], tmp_path / "log"))
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())


def test_frozen_weights_are_held_in_the_compute_dtype(lora_runs, tmp_path, capsys):
    """bfloat16 (asked for on this CPU, as a GPU chooses it): 2 bytes a frozen parameter, none of theirs in AdamW."""
    r = run_main(capsys, tmp_path, *LORA, "--init_from", lora_runs["base"], "--data", REPO / "input.txt", "--B", "8",
                 "--dtype", "bfloat16", "--benchmark", "2")  # (text, as any data)
    assert r.returncode == 0, r.stderr
    base = load_weights(str(lora_runs["base"]))["model"]
    frozen = sum(v.numel() for v in base.values()) - 50257 * 32
    adapters = 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))  # rank 4 x (in + out) of each Linear
    state = float(r.stdout.split("state per rank: ")[1].split(" GiB")[0])
    assert state == pytest.approx((2 * frozen + 16 * adapters) / 2**30, rel=1e-3)


def test_lora_under_fsdp_is_refused_in_one_line(tmp_path, capsys):
    r = run_main(capsys, tmp_path, *LORA, "--B", "8", "--fsdp", "1", "--data", REPO / "input.txt")
    assert r.returncode == 1 and r.stderr.startswith("train_gpt2.py: error: --lora_rank with --fsdp 1: ") and \
        "give --fsdp 0" in r.stderr and r.stderr.count("\n") == 1
