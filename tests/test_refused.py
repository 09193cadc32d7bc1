"""Every file a user hands the scripts is read, or refused in one line (exit 1, no traceback) before any work: nanoGPT's
character-level checkpoint, a config that cannot be built, a zip saved under a .npy name, token ids out of range, a GPU
that is not there. A refusal after the process group started ends it on every rank: no hang, no abort."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import hellaswag
from conftest import REPO, TINY, exit_probe_env, gloo_threads_at_exit, hellaswag_dir, make_examples, run_main, \
    torchrun, train_losses
from train_gpt2 import GPT, GPTConfig

EVAL = ["--data", REPO / "input.txt", "--device", "cpu"]


def one_line_error(r, script="train_gpt2.py"):
    """The run failed with exit status 1 and one line on stderr, which this returns."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"{script}: error: "), r.stderr[-3000:]
    return lines[0]


def nanogpt_char_checkpoint(path):
    """nanoGPT's out-shakespeare-char/ckpt.pt, in its layout: a character-level model of 65 tokens, bias=False,
    compiled (its keys carry _orig_mod.)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=65, n_layer=1, n_head=2, n_embd=16))
    path.parent.mkdir(parents=True)
    torch.save({"model": {"_orig_mod." + k: v for k, v in model.state_dict().items() if not k.endswith(".bias")},
                "optimizer": {}, "model_args": dict(n_layer=1, n_head=2, n_embd=16, block_size=32, bias=False,
                                                    vocab_size=65, dropout=0.2),
                "iter_num": 5000, "best_val_loss": torch.tensor(1.47),
                "config": {"dataset": "shakespeare_char", "batch_size": 64, "block_size": 256}}, path)
    return path


@pytest.mark.parametrize("command", ["--sample", "--export_hf", "--eval_only", "--init_from", "--resume"])
def test_nanogpts_character_level_checkpoint_is_refused_for_its_vocabulary(tmp_path, command, capsys):
    ckpt = nanogpt_char_checkpoint(tmp_path / "out-shakespeare-char" / "ckpt.pt")
    argv = {"--sample": ["--init_from", ckpt, "--sample", "ROMEO:"],
            "--export_hf": ["--init_from", ckpt, "--export_hf", tmp_path / "hf"],
            "--eval_only": ["--init_from", ckpt, "--eval_only", *EVAL],
            "--init_from": ["--init_from", ckpt, *TINY, "--log_dir", "log"],
            "--resume": ["--resume", ckpt, *TINY, "--log_dir", "log"]}[command]
    line = one_line_error(run_main(capsys, tmp_path, *argv))
    assert f"{ckpt}: 65 tokens, not GPT-2's 50257: this project uses GPT-2's BPE" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-shakespeare-char"]  # no log/, no export


def test_hellaswag_refuses_a_character_level_transformers_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HELLASWAG_DIR", str(hellaswag_dir(tmp_path / "hellaswag", make_examples())))
    GPT2LMHeadModel(GPT2Config(vocab_size=65, n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "char")
    capsys.readouterr()  # (save_pretrained's progress bar)
    with pytest.raises(SystemExit) as exit_:
        hellaswag.main(["-m", str(tmp_path / "char"), "-d", "cpu"])
    err = capsys.readouterr().err  # (after transformers' progress bar)
    assert exit_.value.code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"hellaswag.py: error: {tmp_path / 'char'} has a vocabulary of 65 tokens, "
                                            f"not GPT-2's 50257: HellaSwag is scored here with GPT-2's tokenizer")


@pytest.mark.parametrize("config", [dict(n_head=3), dict(n_layer=0), dict(n_embd=-16)],
                         ids=["n_embd not a multiple of n_head", "no layers", "a negative width"])
def test_a_checkpoint_whose_config_cannot_be_built_is_one_line(tmp_path, config, capsys):
    torch.manual_seed(0)
    sd = GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=2, n_head=2, n_embd=16)).state_dict()
    config = dict(dict(block_size=16, vocab_size=50304, n_layer=2, n_head=2, n_embd=16), **config)
    torch.save({"model": sd, "config": config, "step": 10, "val_loss": 7.0}, tmp_path / "model_00010.pt")
    for command in (["--sample", "Hi", "--device", "cpu"], ["--eval_only", *EVAL]):
        line = one_line_error(run_main(capsys, tmp_path, "--init_from", tmp_path / "model_00010.pt", *command))
        assert "model_00010.pt: GPTConfig(" in line and "cannot be built" in line


def test_a_transformers_directory_whose_config_cannot_be_built_is_one_line(tmp_path, capsys, monkeypatch):
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(config, n_head=3)))  # 16 is no multiple of 3
    capsys.readouterr()  # (save_pretrained's progress bar)
    line = one_line_error(run_main(capsys, tmp_path, "--init_from", tmp_path / "hf", "--sample", "Hi"))
    assert line.startswith(f"train_gpt2.py: error: could not load {tmp_path / 'hf'} (ValueError: ")
    monkeypatch.setenv("HELLASWAG_DIR", str(hellaswag_dir(tmp_path / "hellaswag", make_examples())))
    with pytest.raises(SystemExit):
        hellaswag.main(["-m", str(tmp_path / "hf"), "-d", "cpu"])
    err = capsys.readouterr().err
    assert err.startswith(f"hellaswag.py: error: could not load {tmp_path / 'hf'} (ValueError: ")
    assert err.count("\n") == 1


def shards(d, train):
    """A val shard of 2,000 good ids and the given train shards (name: array or a writer of the file)."""
    d.mkdir()
    np.save(d / "edufineweb_val_000000.npy", np.arange(2000, dtype=np.uint16))
    for name, tokens in train.items():
        if callable(tokens):
            tokens(d / name)
        else:
            np.save(d / name, tokens)
    return d


def npz(path):
    with open(path, "wb") as f:  # (np.savez to a file object: the name stays .npy)
        np.savez(f, tokens=np.arange(5000, dtype=np.uint16))


def truncated(path):
    np.save(path, np.arange(5000, dtype=np.uint16))
    path.write_bytes(path.read_bytes()[:3000])


@pytest.mark.parametrize("case, message", [
    ("a zip under a .npy name", "edufineweb_train_000001.npy is a zip (an .npz?), not one array saved by np.save"),
    ("a later shard cut short", "edufineweb_train_000002.npy is cut short or not in its format"),
    ("a negative id", "edufineweb_train_000001.npy is not 1-D token ids below vocab_size 50304 (it holds -1)"),
    ("an id past the vocabulary", "edufineweb_train_000001.npy is not 1-D token ids below vocab_size 50304 (it "
                                  "holds 50304)")])
def test_a_bad_shard_is_one_line_before_step_0(tmp_path, case, message, capsys):
    good = np.arange(5000, dtype=np.uint16)
    train = {"a zip under a .npy name": {"edufineweb_train_000001.npy": npz},
             "a later shard cut short": {"edufineweb_train_000001.npy": good, "edufineweb_train_000002.npy": truncated},
             "a negative id": {"edufineweb_train_000001.npy": np.array([5, -1, 7] * 1000, dtype=np.int32)},
             "an id past the vocabulary": {"edufineweb_train_000001.npy": np.full(5000, 50304, np.uint16)}}[case]
    data = shards(tmp_path / "data", train)
    line = one_line_error(run_main(capsys, tmp_path, *TINY, "--data", data, "--max_steps", "3", "--log_dir", "log"))
    assert message in line
    assert not (tmp_path / "log" / "log.txt").exists()  # before step 0


def test_a_shard_with_bad_ids_read_mid_run_stops_every_rank_in_one_line_naming_the_last_checkpoint(tmp_path):
    """Shard 2's ids are checked when it is first read (step 4 here); both ranks stop there. The process group ends on
    every rank before Python shuts down: no hang, no gloo thread left to abort the exit."""
    bad = np.arange(2000, dtype=np.uint16)
    bad[1000] = 60000
    data = shards(tmp_path / "data", {"edufineweb_train_000001.npy": np.arange(700, dtype=np.uint16),
                                      "edufineweb_train_000002.npy": bad})
    r = torchrun(2, *TINY, "--data", data, "--max_steps", "20", "--checkpoint_interval", "1", "--eval_interval", "100",
                 "--log_dir", "log", cwd=tmp_path, env=exit_probe_env(tmp_path), timeout=120)
    assert r.returncode != 0 and "SIGABRT" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("train_gpt2.py: error: ")]
    assert errors == [f"train_gpt2.py: error: shard {data / 'edufineweb_train_000002.npy'} is not 1-D token ids below "
                      f"vocab_size 50304 (it holds 60000); make it again, then --resume log/model_00004.pt"]
    assert "Traceback (most recent call last):\n  File \"" + str(REPO) not in r.stderr  # (no traceback of ours)
    assert sorted(train_losses(tmp_path / "log")) == [0, 1, 2, 3]  # stopped in step 4, its checkpoint intact
    assert gloo_threads_at_exit(tmp_path) == {0: [], 1: []}


CUDA_HERE = """
import sys, torch
torch.cuda.is_available = lambda: True  # (a machine with two GPUs, as far as these checks ask)
torch.cuda.device_count = lambda: 2
sys.path.insert(0, {repo!r})
import {module}
{module}.main({argv!r})
"""


@pytest.mark.parametrize("script, argv, message", [
    ("train_gpt2", [*TINY[:TINY.index("--device")], "--device", "cuda:5"],
     "train_gpt2.py: error: --device cuda:5: not here (2 GPUs); give auto, cuda, cuda:N, mps or cpu"),
    ("hellaswag", ["-d", "cuda:5"], "hellaswag.py: error: -d cuda:5: no such device here (2 GPUs); give cpu, cuda, "
                                    "cuda:N or mps")])
def test_a_gpu_index_that_is_not_there_is_one_line(tmp_path, script, argv, message):
    code = CUDA_HERE.format(repo=str(REPO), module=script, argv=[str(a) for a in argv])
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == message, r.stderr[-3000:]
