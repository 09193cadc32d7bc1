"""Loading weights safely and offline, fine-tuning, sampling (and streaming it), and the round trip through
transformers: model, tokenizer, greedy generation and the text-generation pipeline, with no network."""
import json
import os
import pickle
import re
import subprocess
import sys
import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import REPO, TINY, MakesAFile, env_for_tests, far_gpt2, hellaswag_dir, hub_cache_with_gpt2, \
    make_examples, mean_val_loss, offline_env, read_log, run_main, run_script
from gpt2_tokenizer import get_encoding
import train_gpt2
from train_gpt2 import GPT

PROMPT = "Hello, I'm a language model,"


def expected_samples(ckpt, prompt, n, max_new_tokens, seed):
    """The samples --sample should print, drawn here with the model's plain forward and top-k 50 by hand."""
    enc, model = get_encoding(), GPT.from_pretrained(str(ckpt)).eval()
    idx = torch.tensor([enc.encode(prompt)] * n)
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            probs = torch.softmax(model(idx[:, -model.config.block_size:])[0][:, -1, :50257], dim=-1)
            topk_probs, topk_indices = torch.topk(probs, 50, dim=-1)
            idx = torch.cat([idx, torch.gather(topk_indices, -1, torch.multinomial(topk_probs, 1, generator=rng))], 1)
    return [enc.decode(row.tolist()) for row in idx], idx


def test_sampling_prints_every_sample_drawn_for_the_seed(shared_run, capsys):
    ckpt = shared_run[0] / "model_00024.pt"
    expected, idx = expected_samples(ckpt, PROMPT, 3, 12, seed=7)
    assert idx.shape == (3, 8 + 12)  # the prompt's 8 tokens and 12 new ones each
    outputs = []
    for seed in (7, 8):  # (the command's own main, in this process)
        train_gpt2.main(["--init_from", str(ckpt), "--sample", PROMPT, "--num_samples", "3", "--max_new_tokens", "12",
                         "--seed", str(seed), "--device", "cpu"])
        outputs.append(capsys.readouterr().out)
    printed = [re.split(r"(?m)^sample \d: ", out)[1:] for out in outputs]  # (a sample may hold line breaks)
    assert printed[0] == [text + "\n" for text in expected]
    assert len(printed[1]) == 3 and printed[1] != printed[0]  # another seed, other samples


def test_one_sample_is_printed_as_it_is_generated(tmp_path, shared_run):
    """The first generated token reaches the pipe while the rest are still being generated: the program flushes as it
    goes. (Without PYTHONUNBUFFERED, which the tests' environment sets: stdout to a pipe is block-buffered.)"""
    ckpt, n = shared_run[0] / "model_00024.pt", 1000
    env = env_for_tests()
    env.pop("PYTHONUNBUFFERED")
    proc = subprocess.Popen([sys.executable, str(REPO / "train_gpt2.py"), "--init_from", str(ckpt), "--sample", PROMPT,
                             "--num_samples", "1", "--max_new_tokens", str(n), "--device", "cpu"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE)
    first = b""
    while len(first.partition(b"\n")[2]) <= len(PROMPT.encode()):  # "sampling from ...", then the prompt and a token
        chunk = os.read(proc.stdout.fileno(), 1 << 16)
        assert chunk, f"the process ended before a generated token came out: {first!r}"
        first += chunk
    generating = proc.poll() is None
    rest = proc.stdout.read()
    assert proc.wait() == 0
    assert generating and len(first) < len(first + rest) / 2  # a token as it comes, not all of them at the end
    out = (first + rest).decode()
    assert out.startswith("sampling from")
    assert out.split("\n", 1)[1].strip() == expected_samples(ckpt, PROMPT, 1, n, seed=42)[0][0].strip()


HF_SIDE = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
out, text, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
tokenizer = AutoTokenizer.from_pretrained(out)
model = AutoModelForCausalLM.from_pretrained(out).eval()
ids = tokenizer(prompt, return_tensors="pt").input_ids
with torch.no_grad():
    torch.save(model(ids).logits, out + "/../hf_logits.pt")
    greedy = model.generate(ids, max_new_tokens=8, do_sample=False)  # (8 + 8 tokens: the model's whole context)
generated = pipeline("text-generation", model=out)(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
print(json.dumps({"ids": tokenizer.encode(text), "greedy": greedy[0].tolist(), "pipeline": generated}))
"""


def test_export_round_trips_through_transformers_with_no_network(tmp_path, shared_run):
    ckpt, out = shared_run[0] / "model_00024.pt", tmp_path / "exported"
    r = run_script("train_gpt2.py", "--init_from", ckpt, "--export_hf", out, cwd=tmp_path, env=offline_env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert {"config.json", "generation_config.json", "model.safetensors", "vocab.json", "merges.txt",
            "tokenizer_config.json", "special_tokens_map.json"} <= set(os.listdir(out))
    text = (REPO / "input.txt").read_text()[:3000] + " naïve café 日本語 🙂 3.14159, 'quoted'\t\n\n  spaces"
    hf = subprocess.run([sys.executable, "-c", HF_SIDE, str(out), text, PROMPT], capture_output=True, text=True,
                        env=offline_env(tmp_path), timeout=300)
    assert hf.returncode == 0, hf.stderr[-3000:]
    hf = json.loads(hf.stdout.strip().splitlines()[-1])
    enc, ours = get_encoding(), GPT.from_pretrained(str(ckpt)).eval()
    assert hf["ids"] == enc.encode_ordinary(text)  # the tokenizer: tiktoken's ids
    idx = torch.tensor([enc.encode(PROMPT)])
    with torch.no_grad():
        diff = (ours(idx)[0][..., :50257] - torch.load(tmp_path / "hf_logits.pt")).abs().max().item()
    assert diff < 1e-4  # the model: our logits
    greedy = ours.generate(idx, 8 + 8, top_k=1)[0].tolist()
    assert hf["greedy"] == greedy  # greedy generation: our greedy tokens
    assert hf["pipeline"] == enc.decode(greedy)  # the pipeline: the prompt and that continuation


def test_finetune_from_a_local_transformers_model(tmp_path, capsys):
    far_gpt2(tmp_path / "hf")
    r = run_main(capsys, tmp_path, "--init_from", tmp_path / "hf", "--data", REPO / "input.txt", "--T", "32", "--B",
                 "2", "--val_steps", "2", "--total_batch_size", "64", "--device", "cpu", "--max_steps", "3",
                 "--log_dir", "log")
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / "log" / "model_00003.pt", weights_only=True)
    assert ckpt["config"] == {"block_size": 64, "vocab_size": 50257, "n_layer": 2, "n_head": 2, "n_embd": 32}
    tokens = get_encoding().encode_ordinary((REPO / "input.txt").read_text(encoding="utf-8"))
    val = torch.tensor(tokens[int(0.9 * len(tokens)):], dtype=torch.long)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()  # (as saved: the copy that was trained)
    with torch.no_grad():  # step 0's val loss is transformers' own loss on the same two val batches
        expected = mean_val_loss(lambda x: hf(x).logits, val, 2, 32, 2)
    assert abs(expected - 10.83) > 0.5  # far from a uniform guess, so the check can tell
    assert float(read_log(tmp_path / "log" / "log.txt")[(0, "val")]) == pytest.approx(expected, abs=2e-4)


def test_hub_weights_without_network_fail_fast_in_one_line(tmp_path):
    env = offline_env(tmp_path, HF_HOME=tmp_path / "empty-cache")
    t0 = time.time()
    r = run_script("train_gpt2.py", *TINY, "--init_from", "gpt2", "--log_dir", "log", cwd=tmp_path, env=env)
    t1 = time.time()
    GPT2Config(n_layer=1).save_pretrained(tmp_path / "no-weights")  # a local directory that fails at once
    baseline = run_script("train_gpt2.py", *TINY, "--init_from", tmp_path / "no-weights", cwd=tmp_path, env=env)
    # at once: about as long as a local failure (the same start-up and imports), not the libraries' retries
    assert r.returncode == 1 and baseline.returncode == 1 and t1 - t0 < 3 * (time.time() - t1)
    assert r.stderr.startswith("train_gpt2.py: error: could not load gpt2 (cannot connect to huggingface.co") and \
        r.stderr.count("\n") == 1 and "give a save_pretrained directory" in r.stderr


def test_a_populated_hub_cache_works_offline(tmp_path):
    hub_cache_with_gpt2(tmp_path / "hf-home" / "hub")
    env = offline_env(tmp_path, HF_HOME=tmp_path / "hf-home", HELLASWAG_DIR=hellaswag_dir(tmp_path, make_examples()))
    r = run_script("train_gpt2.py", "--init_from", "gpt2", "--sample", "Hi", "--device", "cpu", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("sampling from gpt2\nsample 0: Hi")
    r = run_script("hellaswag.py", "-m", "gpt2", "-d", "cpu", "--limit", "4", cwd=tmp_path, env=env)  # (the same way)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1].startswith("4 acc: ")


@pytest.mark.parametrize("how", ["torch.save", "pickle", "pytorch_model.bin"])
def test_a_file_with_code_in_its_pickle_runs_no_code(tmp_path, capsys, how):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model_00008.pt"
    if how == "torch.save":
        torch.save({"model": MakesAFile(marker), "config": {}}, evil)
    elif how == "pickle":
        evil.write_bytes(pickle.dumps({"model": MakesAFile(marker)}))
    else:  # a transformers directory that holds only a pickled state dict
        evil = tmp_path / "hf"
        GPT2Config(vocab_size=50257, n_positions=32, n_embd=16, n_layer=1, n_head=1).save_pretrained(evil)
        torch.save({"transformer.wte.weight": MakesAFile(marker)}, evil / "pytorch_model.bin")
    commands = [["--init_from", evil, "--sample", "Hi"]] + [["--resume", evil]] * (how != "pytorch_model.bin")
    for args in commands:  # (--export_hf loads as --sample does)
        with pytest.raises(SystemExit) as exit_:
            train_gpt2.main([str(a) for a in (*TINY, "--log_dir", tmp_path / "log", *args)])
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and err.count("\n") == 1, err
        assert ("cannot load checkpoint" if how != "pytorch_model.bin" else "could not load") in err
        assert "not loadable with weights_only=True: not a checkpoint, or one holding code" in err
        assert not marker.exists()


def test_a_prompt_may_hold_the_end_of_text_token(shared_run, capsys):
    """<|endoftext|> typed in a prompt is the token GPT-2 saw between its documents, not an error."""
    r = run_main(capsys, shared_run[0].parent, "--init_from", shared_run[0] / "model_00024.pt", "--sample",
                 "The end.<|endoftext|>A new", "--num_samples", "2", "--max_new_tokens", "4", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("sample 0: The end.<|endoftext|>A new") == 1
