"""Evaluations say what they measured: --eval_only's shape (a checkpoint's own B, T and val_steps, or a pretrained
model's block size), a val split too short for val_steps (its whole batches, each once, said in the log and the JSON;
one process and two alike: in test_interop), HellaSwag's float32 for a directory saved in bfloat16, and a
checkpoint's val_loss (its own weights', or None)."""
import json

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import hellaswag
from conftest import REPO, TINY, far_gpt2, mean_val_loss, read_log, run_main
from gpt2_tokenizer import get_encoding
from train_gpt2 import GPT, GPTConfig

INPUT = REPO / "input.txt"


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A transformers GPT-2 with an 8-token context, its weights far from a fresh init (N(0, 0.5)), and shards whose
    val split holds 8 batches of the recipe's B=64 by T=8 tokens, and 100 tokens more: (model, shards, val tokens)."""
    d = tmp_path_factory.mktemp("pretrained")
    far_gpt2(d / "gpt2-8", n_positions=8)
    ids = np.array(get_encoding().encode_ordinary(INPUT.read_text(encoding="utf-8")), dtype=np.uint16)
    (d / "data").mkdir()
    np.save(d / "data" / "edufineweb_val_000000.npy", ids[:8 * 64 * 8 + 100])
    np.save(d / "data" / "edufineweb_train_000001.npy", ids[10000:20000])
    return d / "gpt2-8", d / "data", torch.tensor(ids[:8 * 64 * 8 + 100], dtype=torch.long)


def test_eval_only_of_our_checkpoint_measures_with_its_own_B_T_and_val_steps(shared_run, tmp_path, capsys):
    r = run_main(capsys, tmp_path, "--eval_only", "--init_from", shared_run[0] / "model_00024.pt", "--data", INPUT,
                 "--device", "cpu")
    assert r.returncode == 0, r.stderr
    result = last_json(r.stdout)
    assert (result["B"], result["T"], result["val_steps"], result["val_tokens"]) == (4, 16, 2, 4 * 16 * 2)
    assert f"{result['val_loss']:.4f}" == read_log(shared_run[0] / "log.txt")[(24, "val")]  # the run's own batches


def test_eval_only_of_a_pretrained_model_takes_its_block_size_and_a_short_splits_whole_batches(
        pretrained, tmp_path, capsys):
    """T: the model's 8 tokens; B and val_steps: the recipe's 64 and 20. The split holds 8 batches of 64 x 8 tokens:
    those 8, each once, and the log and the JSON say so."""
    path, data, val = pretrained
    r = run_main(capsys, tmp_path, "--eval_only", "--init_from", path, "--data", data, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    result = last_json(r.stdout)
    assert (result["B"], result["T"], result["val_steps_asked"]) == (64, 8, 20)
    assert (result["val_steps"], result["val_tokens"]) == (8, 8 * 64 * 8)
    assert "val: 8 batches of B*T*world_size tokens, all there are, not --val_steps 20" in r.stdout
    model = GPT2LMHeadModel.from_pretrained(path).eval()
    with torch.no_grad():
        assert result["val_loss"] == pytest.approx(mean_val_loss(lambda x: model(x).logits, val, 64, 8, 8), abs=2e-4)


def test_training_with_a_short_val_split_uses_its_whole_batches_each_once(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    tokens = np.arange(300, dtype=np.uint16) * 97  # 4 batches of 4 x 16 tokens (and 43 over)
    np.save(data / "edufineweb_val_000000.npy", tokens)
    np.save(data / "edufineweb_train_000001.npy", np.arange(5000, dtype=np.uint16))
    r = run_main(capsys, tmp_path, *TINY, "--data", data, "--val_steps", "20", "--max_steps", "1", "--log_dir", "log")
    assert r.returncode == 0, r.stderr
    assert "val: 4 batches of B*T*world_size tokens, all there are, not --val_steps 20" in r.stdout
    torch.manual_seed(1337)  # (the run's seed: its initial weights)
    model = GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=2, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        expected = mean_val_loss(lambda x: model(x)[0], torch.tensor(tokens, dtype=torch.long), 4, 16, 4)
    assert read_log(tmp_path / "log" / "log.txt")[(0, "val")] == f"{expected:.4f}"


def test_hellaswag_scores_a_directory_saved_in_bfloat16_in_float32(tmp_path):
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=32, n_embd=16, n_layer=1, n_head=2)).to(
        torch.bfloat16).save_pretrained(tmp_path / "bf16")
    saved = GPT2LMHeadModel.from_pretrained(tmp_path / "bf16")
    assert saved.dtype == torch.bfloat16  # (what transformers 5 gives by default)
    model = hellaswag.load_model(str(tmp_path / "bf16"))
    assert model.dtype == torch.float32
    assert all(torch.equal(p, saved.state_dict()[k].float()) for k, p in model.state_dict().items())


def test_a_checkpoint_carries_the_val_loss_of_its_own_weights_or_none(tmp_path, capsys):
    r = run_main(capsys, tmp_path, *TINY, "--max_steps", "6", "--eval_interval", "4", "--checkpoint_interval", "3",
                 "--log_dir", "log")
    assert r.returncode == 0, r.stderr
    log = read_log(tmp_path / "log" / "log.txt")
    at_3, at_6 = (torch.load(tmp_path / "log" / f"model_0000{s}.pt", weights_only=True) for s in (3, 6))
    assert (3, "val") not in log and at_3["val_loss"] is None  # no eval at step 3: not step 0's number
    assert f"{at_6['val_loss']:.4f}" == log[(6, "val")]
