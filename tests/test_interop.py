"""Interoperation with the anchors: any model evaluated in one command (--eval_only, on one process or under torchrun,
with HellaSwag or without it), the checkpoints the lecture and nanoGPT write (loaded safely for --init_from, --sample,
--export_hf and --eval_only), the token files of nanoGPT and llm.c (read as fineweb.py's .npy shards are), and a run
resumed in another dtype. Every file is written here in its anchor's exact layout."""
import copy
import json
import math
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

import hellaswag
from conftest import REPO, RUN, TINY, MakesAFile, env_for_tests, far_gpt2, hellaswag_dir, make_examples, \
    mean_val_loss, offline_env, read_log, run_main, torchrun_cmd, train_losses
from gpt2_tokenizer import get_encoding
from train_gpt2 import GPT, DataLoaderLite, GPTConfig, UsageError

INPUT = REPO / "input.txt"
ANCHOR_CONFIG = dict(block_size=16, vocab_size=50304, n_layer=2, n_head=2, n_embd=16)  # TINY's model
EVAL_FLAGS = ["--data", INPUT, "--T", "16", "--B", "4", "--val_steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def tokens():
    """input.txt as GPT-2 ids, and its val part (the last 10%), as the text loader splits it."""
    ids = get_encoding().encode_ordinary(INPUT.read_text(encoding="utf-8"))
    return np.array(ids, dtype=np.uint16), torch.tensor(ids[int(0.9 * len(ids)):], dtype=torch.long)


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


# -- 1. --eval_only ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return far_gpt2(tmp_path_factory.mktemp("hf") / "tiny-gpt2")


def test_eval_only_gives_transformers_own_val_loss_and_leaves_its_directory_empty(tmp_path, hf_dir, tokens):
    cwd, no_hellaswag = tmp_path / "cwd", tmp_path / "no-hellaswag"
    cwd.mkdir()
    no_hellaswag.mkdir()
    r = subprocess.run([sys.executable, str(REPO / "train_gpt2.py"), "--eval_only", "--init_from", str(hf_dir),
                        "--data", str(INPUT), "--T", "32", "--B", "2", "--val_steps", "2", "--device", "cpu",
                        "--hellaswag", "1"], cwd=cwd, env=offline_env(tmp_path, HELLASWAG_DIR=no_hellaswag),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [ln for ln in r.stdout.splitlines() if ln.startswith("warning: HellaSwag is unavailable, going on "
                                                                     "without it (")]
    assert len(warnings) == 1
    model = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():  # transformers' own loss on the two val batches: tokens[n90:][0:65] and [64:129]
        expected = mean_val_loss(lambda x: model(x).logits, tokens[1], 2, 32, 2)
    assert abs(expected - math.log(50257)) > 0.5  # far from a uniform guess, so the check can tell
    result = last_json(r.stdout)
    assert result["val_loss"] == pytest.approx(expected, abs=2e-4)
    assert f"step     0 | val loss: {result['val_loss']:.4f}" in r.stdout.splitlines()
    assert result["val_tokens"] == 2 * 2 * 32 and result["world_size"] == 1 and result["dtype"] == "float32"
    assert result["model"] == str(hf_dir) and result["data"] == str(INPUT)
    assert result["hellaswag_acc"] is result["hellaswag_acc_norm"] is result["hellaswag_examples"] is None
    assert os.listdir(cwd) == []  # no log/ directory, no lock, no file


def test_eval_only_hellaswag_equals_the_hellaswag_command(tmp_path, hf_dir, capsys, monkeypatch):
    monkeypatch.setenv("HELLASWAG_DIR", str(hellaswag_dir(tmp_path / "hellaswag", make_examples())))
    (tmp_path / "cwd").mkdir()
    r = run_main(capsys, tmp_path / "cwd", "--eval_only", "--init_from", hf_dir, "--data", INPUT, "--T", "32", "--B",
                 "2", "--val_steps", "1", "--device", "cpu", "--hellaswag", "1")
    assert r.returncode == 0, r.stderr
    hellaswag.main(["-m", str(hf_dir), "-d", "cpu"])  # transformers' model, scored by the lecture's script
    reference = capsys.readouterr().out.strip().splitlines()[-1]
    result = last_json(r.stdout)
    n, acc, acc_norm = result["hellaswag_examples"], result["hellaswag_acc"], result["hellaswag_acc_norm"]
    assert reference == f"{n} acc: {acc:.4f} acc_norm: {acc_norm:.4f}" and n == 8
    assert (f"step     0 | HellaSwag accuracy: {round(acc_norm * n)}/{n}={acc_norm:.4f} (acc {acc:.4f})"
            in r.stdout.splitlines())
    assert any(ln.startswith("step     0 | val loss: ") for ln in r.stdout.splitlines())
    assert os.listdir(tmp_path / "cwd") == []


def test_eval_only_on_two_ranks_equals_one_process_reading_their_batches(tmp_path, shared_run, tokens, capsys,
                                                                          monkeypatch):
    """A val split of 8 batches of 4 x 16 tokens (and 10 more), --val_steps 20 asked: one process reads the 8, each
    once; two ranks read 4 steps of 2 batches, the same 8 (rank r's step k: batch 2k+r); HellaSwag's 7 examples split
    4 and 3."""
    ckpt, data = shared_run[0] / "model_00024.pt", hellaswag_dir(tmp_path / "hellaswag", make_examples()[:7])
    (tmp_path / "shards").mkdir()
    np.save(tmp_path / "shards" / "edufineweb_val_000000.npy", tokens[0][:8 * 64 + 10])
    np.save(tmp_path / "shards" / "edufineweb_train_000001.npy", tokens[0][10000:20000])
    flags = ["--eval_only", "--init_from", ckpt, "--data", tmp_path / "shards", "--T", "16", "--B", "4", "--device",
             "cpu", "--hellaswag", "1", "--val_steps", "20"]
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    two = subprocess.run(torchrun_cmd(2, *flags), cwd=tmp_path / "two", env=env_for_tests(HELLASWAG_DIR=data),
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    monkeypatch.setenv("HELLASWAG_DIR", str(data))
    one = run_main(capsys, tmp_path / "one", *flags)
    assert one.returncode == 0, one.stderr
    two, one = last_json(two.stdout), last_json(one.stdout)
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-6)
    assert (one["val_steps"], two["val_steps"], one["val_steps_asked"], two["val_steps_asked"]) == (8, 4, 20, 20)
    assert two["val_tokens"] == one["val_tokens"] == 8 * 4 * 16
    hella = ("hellaswag_acc", "hellaswag_acc_norm", "hellaswag_examples")
    assert [two[k] for k in hella] == [one[k] for k in hella] and one["hellaswag_examples"] == 7
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert os.listdir(tmp_path / "two") == os.listdir(tmp_path / "one") == []  # no log/ directory


# -- 2. the anchors' checkpoints ---------------------------------------------------------------------------------

LECTURE_SCRIPT = '''
"""Saves a checkpoint as the lecture's train_gpt2.py does: its own GPTConfig dataclass, run as __main__."""
import os, sys
from dataclasses import dataclass
import torch
sys.path.insert(0, sys.argv[1])
import train_gpt2

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768

out = sys.argv[2]
config = GPTConfig(block_size=16, vocab_size=50304, n_layer=2, n_head=2, n_embd=16)
torch.manual_seed(5)
model = train_gpt2.GPT(train_gpt2.GPTConfig(**vars(config)))
with torch.no_grad():  # biases and LayerNorms far from their init: a loader that dropped one would show
    for p in model.parameters():
        p.add_(0.1 * torch.randn_like(p))
sd = model.state_dict()
for run, prefix in (("eager", ""), ("compiled", "_orig_mod.")):  # a compiled module's keys carry _orig_mod.
    os.makedirs(os.path.join(out, run, "log"))
    torch.save({"model": {prefix + k: v for k, v in sd.items()}, "config": config, "step": 10, "val_loss": 7.25},
               os.path.join(out, run, "log", "model_00010.pt"))
torch.save(sd, os.path.join(out, "weights.pt"))
'''


@pytest.fixture(scope="module")
def lecture(tmp_path_factory):
    """{"eager": path, "compiled": path} of the lecture's log/model_00010.pt, and the plain state dict saved."""
    d = tmp_path_factory.mktemp("lecture")
    (d / "lecture_train.py").write_text(LECTURE_SCRIPT)
    r = subprocess.run([sys.executable, "lecture_train.py", str(REPO), str(d)], cwd=d, env=env_for_tests(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    paths = {run: d / run / "log" / "model_00010.pt" for run in ("eager", "compiled")}
    with zipfile.ZipFile(paths["eager"]) as z:  # (the config pickled by reference to the script's own class)
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"c__main__\nGPTConfig\n" in pkl
    return paths, torch.load(d / "weights.pt", weights_only=True)


def nanogpt_checkpoint(path, bias=False):
    """nanoGPT's out/ckpt.pt (its weights, compiled: _orig_mod.), and the state dict of the same model in our layout:
    bias=False (nanoGPT's default) has no biases, which are zeros in ours; bias=True keeps them, far from zero."""
    torch.manual_seed(6)
    model = GPT(GPTConfig(**ANCHOR_CONFIG))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.zeros_like(p) if name.endswith(".bias") and not bias else p + 0.1 * torch.randn_like(p))
    params = [p for name, p in model.named_parameters() if bias or not name.endswith(".bias")]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=6e-4, betas=(0.9, 0.95))
    x = torch.randint(0, 50257, (2, 16))
    model(x, x)[1].backward()
    optimizer.step()  # (a real optimizer state: one step)
    ours = {k: v.clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True)
    torch.save({"model": {"_orig_mod." + k: v for k, v in ours.items() if bias or not k.endswith(".bias")},
                "optimizer": optimizer.state_dict(),
                "model_args": dict(n_layer=2, n_head=2, n_embd=16, block_size=16, bias=bias, vocab_size=50304,
                                   dropout=0.0),
                "iter_num": 250, "best_val_loss": torch.tensor(6.5),
                "config": {"out_dir": "out", "eval_interval": 250, "batch_size": 12, "block_size": 16,
                           "gradient_accumulation_steps": 40, "dataset": "openwebtext", "learning_rate": 6e-4,
                           "max_iters": 600000, "bias": bias, "dropout": 0.0, "compile": True, "dtype": "bfloat16"}},
               path)
    return ours


@pytest.fixture(scope="module")
def nanogpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("nanogpt") / "out" / "ckpt.pt"
    return path, nanogpt_checkpoint(path)


@pytest.fixture(scope="module")
def nanogpt_with_biases(tmp_path_factory):
    path = tmp_path_factory.mktemp("nanogpt-bias") / "out" / "ckpt.pt"
    return path, nanogpt_checkpoint(path, bias=True)


@pytest.fixture(params=["lecture", "lecture compiled", "nanoGPT", "nanoGPT bias=True"])
def anchor(request):
    """(an anchor's checkpoint, the state dict our model should hold after loading it)"""
    if request.param.startswith("nanoGPT"):
        return request.getfixturevalue("nanogpt_with_biases" if request.param.endswith("True") else "nanogpt")
    paths, weights = request.getfixturevalue("lecture")
    return paths["compiled" if request.param.endswith("compiled") else "eager"], weights


def model_with(weights):
    model = GPT(GPTConfig(**ANCHOR_CONFIG))
    model.load_state_dict(weights)
    return model.eval()


def test_an_anchors_checkpoint_evaluates_to_its_weights_val_loss(tmp_path, anchor, tokens, capsys):
    path, weights = anchor
    r = run_main(capsys, tmp_path, "--eval_only", "--init_from", path, *EVAL_FLAGS, "--hellaswag", "0")
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        expected = mean_val_loss(lambda x: model_with(weights)(x)[0], tokens[1], 4, 16, 2)
    assert last_json(r.stdout)["val_loss"] == pytest.approx(expected, abs=1e-5)
    assert os.listdir(tmp_path) == []


def test_an_anchors_checkpoint_exports_to_transformers_with_its_logits(tmp_path, anchor, capsys):
    path, weights = anchor
    r = run_main(capsys, tmp_path, "--init_from", path, "--export_hf", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    idx = torch.tensor([get_encoding().encode("Hello, I'm a language model, and")])
    with torch.no_grad():
        hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()(idx).logits
        expected = model_with(weights)(idx)[0][..., :50257]
    assert (hf - expected).abs().max().item() < 1e-4


def test_an_anchors_checkpoint_samples(tmp_path, anchor, capsys):
    r = run_main(capsys, tmp_path, "--init_from", anchor[0], "--sample", "Hello", "--num_samples", "2",
                 "--max_new_tokens", "5", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert f"sampling from {anchor[0]}" in r.stdout.splitlines()
    assert [ln[:len("sample 0: Hello")] for ln in r.stdout.splitlines() if ln.startswith("sample ")] == \
        ["sample 0: Hello", "sample 1: Hello"]


def test_an_anchors_checkpoint_fine_tunes(tmp_path, anchor, tokens, capsys):
    path, weights = anchor
    r = run_main(capsys, tmp_path, "--init_from", path, *EVAL_FLAGS, "--total_batch_size", "64", "--max_steps", "2",
                 "--hellaswag", "0", "--log_dir", "log")
    assert r.returncode == 0, r.stderr
    log = read_log(tmp_path / "log" / "log.txt")
    assert (0, "train") in log and (1, "train") in log and (tmp_path / "log" / "model_00002.pt").exists()
    with torch.no_grad():  # it started from the checkpoint's weights
        expected = mean_val_loss(lambda x: model_with(weights)(x)[0], tokens[1], 4, 16, 2)
    assert float(log[(0, "val")]) == pytest.approx(expected, abs=6e-5)


def test_an_anchors_checkpoint_is_not_a_run_to_resume(tmp_path, anchor, capsys):
    r = run_main(capsys, tmp_path, *TINY, "--resume", anchor[0], "--log_dir", "log")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert f"{anchor[0]} holds weights, not a run to resume" in r.stderr
    assert not (tmp_path / "log").exists()


def test_nanogpts_bias_free_checkpoint_loads_as_zero_biases_and_says_so(nanogpt, capsys):
    path, weights = nanogpt
    assert not any(k.endswith(".bias") for k in torch.load(path, weights_only=True)["model"])  # (bias=False)
    loaded = GPT.from_pretrained(str(path)).eval()
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 1 and f"{path} is nanoGPT's: bias=False: zero biases, the same function" in said[0]
    assert "GELU" in said[0]  # and it names the difference
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model_with(weights)(idx)[0])


def test_nanogpts_exact_gelu_differs_from_ours_only_slightly(nanogpt):
    """What the loading line says: nanoGPT's MLP uses nn.GELU() (exact), ours the lecture's tanh approximation."""
    ours = model_with(nanogpt[1])
    exact = copy.deepcopy(ours)
    for block in exact.transformer.h:
        block.mlp.gelu = torch.nn.GELU()
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (exact(idx)[0] - ours(idx)[0]).abs().max().item()
    assert 1e-7 < diff < 1e-2


@pytest.mark.parametrize("case", ["a layer missing", "a wrong shape"])
def test_weights_that_do_not_fit_their_config_are_one_line(tmp_path, case, capsys):
    torch.manual_seed(0)
    sd = GPT(GPTConfig(**ANCHOR_CONFIG)).state_dict()
    config = dict(ANCHOR_CONFIG, n_layer=3) if case == "a layer missing" else ANCHOR_CONFIG
    if case == "a wrong shape":
        sd["transformer.ln_f.weight"] = torch.ones(15)
    torch.save({"model": sd, "config": config, "step": 10, "val_loss": 7.0}, tmp_path / "model_00010.pt")
    for command in (["--eval_only", *EVAL_FLAGS], ["--sample", "Hi", "--device", "cpu"]):
        r = run_main(capsys, tmp_path, "--init_from", tmp_path / "model_00010.pt", *command)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith(f"train_gpt2.py: error: {tmp_path / 'model_00010.pt'}: its weights do not fit its "
                                   f"config (")
        assert "Traceback" not in r.stderr


def test_a_lecture_layout_checkpoint_with_code_in_its_config_runs_no_code(tmp_path, capsys):
    marker, evil = tmp_path / "pwned", tmp_path / "log" / "model_00010.pt"
    evil.parent.mkdir()
    torch.manual_seed(0)
    torch.save({"model": GPT(GPTConfig(**ANCHOR_CONFIG)).state_dict(), "config": MakesAFile(marker), "step": 10,
                "val_loss": 7.0}, evil)
    torch.load(evil, weights_only=False)  # (loaded unsafely, it would run: the file is what it claims)
    assert marker.exists()
    marker.unlink()
    for command in (["--eval_only", *EVAL_FLAGS], [*TINY, "--max_steps", "2", "--log_dir", tmp_path / "run"]):
        r = run_main(capsys, tmp_path, "--init_from", evil, *command)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert f"cannot load checkpoint {evil}" in r.stderr and "not loadable with weights_only=True" in r.stderr
        assert not marker.exists()


def test_our_checkpoints_carry_the_lectures_val_loss(shared_run):
    ckpt = torch.load(shared_run[0] / "model_00024.pt", weights_only=True)
    assert f"{ckpt['val_loss']:.4f}" == read_log(shared_run[0] / "log.txt")[(24, "val")]


# -- 3. the anchors' token files ---------------------------------------------------------------------------------


def llmc_shard(path, tokens, header=(20240520, 1), count=None, dtype=np.uint16):
    """llm.c's .bin: 256 int32 (magic, version, token count, zeros), then the tokens."""
    head = np.zeros(256, dtype=np.int32)
    head[:3] = [*header, len(tokens) if count is None else count]
    with open(path, "wb") as f:
        f.write(head.tobytes())
        f.write(np.asarray(tokens, dtype=dtype).tobytes())
    return path


def token_dirs(root, train, val):
    """The same tokens three ways: fineweb.py's .npy shards, nanoGPT's raw bins, llm.c's shards."""
    dirs = {name: root / name for name in ("npy", "nanoGPT", "llm.c")}
    for d in dirs.values():
        d.mkdir(parents=True)
    np.save(dirs["npy"] / "edufineweb_val_000000.npy", val)
    np.save(dirs["npy"] / "edufineweb_train_000001.npy", train)
    train.tofile(dirs["nanoGPT"] / "train.bin")  # (no header)
    val.tofile(dirs["nanoGPT"] / "val.bin")
    llmc_shard(dirs["llm.c"] / "fineweb_val_000000.bin", val)
    llmc_shard(dirs["llm.c"] / "fineweb_train_000001.bin", train)
    return dirs


def test_npy_nanogpt_and_llmc_token_files_train_bit_identically(tmp_path, tokens, capsys):
    ids = tokens[0]
    dirs = token_dirs(tmp_path / "data", ids[:20000], ids[20000:24000])
    logs = {}
    for name, d in dirs.items():
        (tmp_path / name).mkdir()
        r = run_main(capsys, tmp_path / name, *TINY, "--data", d, "--max_steps", "3", "--eval_interval", "3",
                     "--log_dir", "log")
        assert r.returncode == 0, r.stderr
        logs[name] = (tmp_path / name / "log" / "log.txt").read_text()
    assert logs["npy"].count(" train ") == 3 and logs["npy"].count(" val ") == 2
    assert logs["nanoGPT"] == logs["npy"] and logs["llm.c"] == logs["npy"]
    weights = {name: torch.load(tmp_path / name / "log" / "model_00003.pt", weights_only=True)["model"]
               for name in dirs}
    for name in ("nanoGPT", "llm.c"):  # the trained weights, bit for bit
        assert all(torch.equal(v, weights[name][k]) for k, v in weights["npy"].items()), name


@pytest.mark.parametrize("case", ["wrong magic", "wrong version", "count disagrees with the size", "llama-3"])
def test_a_bad_llmc_header_is_a_usage_error_naming_the_file(tmp_path, case):
    ids = np.arange(1000, dtype=np.uint16)
    llmc_shard(tmp_path / "fineweb_val_000000.bin", ids)
    shard = tmp_path / "fineweb_train_000001.bin"
    if case == "wrong magic":
        llmc_shard(shard, ids, header=(20240521, 1))
    elif case == "wrong version":
        llmc_shard(shard, ids, header=(20240520, 2))
    elif case == "count disagrees with the size":
        llmc_shard(shard, ids, count=999)
    else:  # llm.c's llama-3 shards: their own magic and version, uint32 tokens
        llmc_shard(shard, ids, header=(20240801, 7), dtype=np.uint32)
    with pytest.raises(UsageError, match=re.escape(f"shard {shard} is not llm.c's GPT-2 format")):
        DataLoaderLite(2, 8, data_root=str(tmp_path))


def test_a_bad_llmc_shard_stops_main_in_one_line(tmp_path, capsys):
    ids = np.arange(1000, dtype=np.uint16)
    (tmp_path / "data").mkdir()
    llmc_shard(tmp_path / "data" / "fineweb_val_000000.bin", ids)
    shard = llmc_shard(tmp_path / "data" / "fineweb_train_000001.bin", ids, header=(20240801, 7), dtype=np.uint32)
    r = run_main(capsys, tmp_path, *TINY, "--data", tmp_path / "data", "--max_steps", "2", "--log_dir", "log")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"train_gpt2.py: error: shard {shard} is not llm.c's GPT-2 format")
    assert not (tmp_path / "log").exists()


def test_a_nanogpt_bin_with_ids_beyond_the_vocabulary_is_refused(tmp_path):
    ids = np.arange(1000, dtype=np.uint16)
    ids.tofile(tmp_path / "val.bin")
    ids[500] = 50304
    ids.tofile(tmp_path / "train.bin")
    with pytest.raises(UsageError, match=re.escape(f"shard {tmp_path / 'train.bin'} is not 1-D token ids below "
                                                   f"vocab_size 50304")):
        DataLoaderLite(2, 8, data_root=str(tmp_path))


# -- 4. resuming in another dtype --------------------------------------------------------------------------------

NO_SCALER = "the checkpoint has no gradient scaler (a bfloat16 or float32 run): float16 starts a new one"


def test_a_float32_checkpoint_resumes_in_float16_with_a_new_scaler(tmp_path, shared_run, capsys):
    r = run_main(capsys, tmp_path, *RUN, "--max_steps", "10", "--dtype", "float16", "--resume",
                 shared_run[0] / "model_00008.pt", "--log_dir", tmp_path / "log")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines().count(NO_SCALER) == 1
    losses = train_losses(tmp_path / "log")
    assert sorted(losses) == [8, 9] and all(math.isfinite(v) for v in losses.values())
    assert torch.load(tmp_path / "log" / "model_00010.pt", weights_only=True)["scaler"]  # float16's scaler, kept


def test_a_float16_checkpoint_resumes_in_bfloat16_and_float32(tmp_path, capsys):
    r = run_main(capsys, tmp_path, *RUN, "--dtype", "float16", "--max_steps", "4", "--checkpoint_interval", "2",
                 "--log_dir", tmp_path / "fp16")
    assert r.returncode == 0, r.stderr
    ckpt = tmp_path / "fp16" / "model_00002.pt"
    assert torch.load(ckpt, weights_only=True)["scaler"]  # (it has a gradient scaler's state)
    for dtype in ("bfloat16", "float32"):
        r = run_main(capsys, tmp_path, *RUN, "--max_steps", "4", "--dtype", dtype, "--resume", ckpt, "--log_dir",
                     tmp_path / dtype)
        assert r.returncode == 0, r.stderr
        assert f"dtype: {dtype} (asked for)" in r.stdout and NO_SCALER not in r.stdout
        written = torch.load(tmp_path / dtype / "model_00004.pt", weights_only=True)
        assert written["args"]["dtype"] == dtype and written["scaler"] == {}  # (no gradient scaler: it was dropped)
        losses = train_losses(tmp_path / dtype)
        assert sorted(losses) == [2, 3] and all(math.isfinite(v) for v in losses.values())
