"""Your own assistant: conversations as data (--data FILE.jsonl), the loss on the replies alone, the chat template that
training, --chat and the exported tokenizer share, --chat itself, and bad files refused in one line before step 0."""
import json
import re
import signal
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel, pipeline

from conftest import CHAT, REPLY, REPO, env_for_tests, far_gpt2, read_log, run_main, run_script
from gpt2_tokenizer import EOT, encode_chat, get_encoding, save_hf_tokenizer

CONVERSATIONS = [  # what a template can trip on: spaces and blank lines around contents, an empty content, a content
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello there."}],  # that starts with
    [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "  what is 2+2?\n\n"},  # punctuation
     {"role": "assistant", "content": "...4!"}, {"role": "user", "content": ""}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "\n\n\nblank lines\n  "}],
    [{"role": "user", "content": "naïve café 日本語 🙂 'quoted's"}, {"role": "assistant", "content": "\n\n  3.14159"},
     {"role": "user", "content": "and then?"}],
]


def test_the_exported_tokenizers_chat_template_gives_the_ids_training_and_chat_use(tmp_path):
    save_hf_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    enc = get_encoding()
    for messages in CONVERSATIONS:
        for prompt in (False, True):  # (True: what --chat feeds the model before a reply)
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True, return_dict=True)
            assert encode_chat(messages, add_generation_prompt=prompt)[0] == ids["input_ids"], (messages, prompt)
        ids, mask = encode_chat(messages)  # the loss's targets: each reply, stripped, and the token that ends it
        replies = [" " + m["content"].strip() + "<|endoftext|>" for m in messages if m["role"] == "assistant"]
        assert enc.decode([i for i, m in zip(ids, mask) if m]) == "".join(replies)
        assert enc.decode([i for i, m in zip(ids, mask) if not m]).count("User:") == sum(
            m["role"] == "user" for m in messages)


def reply_tokens(path):
    """The reply tokens of a file's conversations, counted here: each assistant content after a space, and its end."""
    enc = get_encoding()
    conversations = [json.loads(line)["messages"] for line in path.read_text().splitlines()]
    return [sum(len(enc.encode_ordinary(" " + m["content"])) + 1 for m in c if m["role"] == "assistant")
            for c in conversations]


def test_a_tiny_model_learns_the_replies_and_no_loss_is_taken_on_the_users_words(chat_run):
    """The users' turns are random words, the replies fixed: a val loss near 0 is reached only when the loss counts the
    replies alone (and every reply: the model learned them all in 40 steps, sharded on 2 ranks)."""
    log, r = chat_run
    assert "; FSDP; " in r.stdout
    counts = reply_tokens(log.parent / "chats.jsonl")  # (the last tenth of the conversations is val)
    assert f"train: 180 conversations, {sum(counts[:180]):,} reply tokens\n" in r.stdout
    assert f"val: 20 conversations, {sum(counts[180:]):,} reply tokens\n" in r.stdout
    losses = read_log(log / "log.txt")
    assert float(losses[(0, "val")]) > 10 and float(losses[(40, "val")]) < 0.1
    samples = re.split(r"rank \d sample \d: ", r.stdout.split("step    40 | val loss")[1])[1:]  # (2 ranks' lines,
    assert len(samples) == 8 and all(" User: " in s and "Assistant: " in s for s in samples), samples  # interleaved)
    assert sum(f"Assistant: {REPLY}" in s for s in samples) >= 4, samples  # (drawn top-k: most are exact)


def test_chat_answers_and_the_exported_pipeline_answers_alike(chat_run, tmp_path):
    ckpt = chat_run[0] / "model_00040.pt"
    lines = "hello there\nwho are you\n" + "the dog runs into the water with the ball " * 3 + "\n"
    r = run_script("train_gpt2.py", "--init_from", ckpt, "--chat", "--top_k", "1", "--max_new_tokens", "16",
                   "--system", "Be brief.", cwd=tmp_path, input=lines)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{REPLY}\n" * 3  # a reply a line read, streamed as it came
    assert "(the block of 64 tokens is full: the oldest turns go)" in r.stderr  # (before the third line's turn)
    assert r.stderr.strip().splitlines()[-1].startswith("3 replies: ")  # time to the first token, then tokens/s
    r = run_script("train_gpt2.py", "--init_from", ckpt, "--export_hf", tmp_path / "hf", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    chat = pipeline("text-generation", model=str(tmp_path / "hf"))
    out = chat([{"role": "user", "content": "hello there"}], max_new_tokens=16, do_sample=False)
    reply = out[0]["generated_text"][-1]  # (GPT-2 puts the space before a word in the word's token: " I")
    assert reply["role"] == "assistant" and reply["content"] == " " + REPLY


def test_chat_with_top_k_1_replies_as_transformers_greedy_generate_does_turn_after_turn(tmp_path):
    """A GPT-2 far from any training (only a faithful computation gives transformers' tokens), through the exported
    tokenizer's chat template: each turn's reply, the history kept in the KV cache between turns."""
    far_gpt2(tmp_path / "hf")
    save_hf_tokenizer(tmp_path / "hf", 64)
    turns = ["Hi, who are you?", "Tell me more.", "Why?"]
    r = run_script("train_gpt2.py", "--init_from", tmp_path / "hf", "--chat", "--top_k", "1", "--max_new_tokens", "5",
                   "--system", "You are a test.", "--device", "cpu", cwd=tmp_path, input="\n".join(turns) + "\n")
    assert r.returncode == 0 and "dropped" not in r.stderr, r.stderr
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    messages, expected = [{"role": "system", "content": "You are a test."}], ""
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=EOT, pad_token_id=EOT)
        new = out[0, ids.size(1):]
        reply = tokenizer.decode(new, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply})
        expected += reply.removeprefix(" ") + "\n"
    assert r.stdout == expected


def test_ctrl_c_ends_a_chat_cleanly(chat_run, tmp_path):
    proc = subprocess.Popen([sys.executable, str(REPO / "train_gpt2.py"), "--init_from", chat_run[0] / "model_00040.pt",
                             "--chat", "--top_k", "1"], cwd=tmp_path, env=env_for_tests(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdin.write("hello\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == f"{REPLY}\n"  # (then it waits for the next line)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("1 replies: ")


BAD = {  # the third line of a file (the first empty, skipped but counted; the second a conversation), and the error
    "not JSON": (b'{"messages": [{"role": "user", "content": "hi"}', "chats.jsonl line 3 is not JSON in UTF-8"),
    "not UTF-8": (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "chats.jsonl line 3 is not JSON in UTF-8"),
    "no messages": (b'{"text": "a document, not a conversation"}', 'chats.jsonl line 3 has no "messages" list'),
    "a role": (b'{"messages": [{"role": "bot", "content": "hi"}]}',
               "chats.jsonl line 3: role 'bot' is not system, user or assistant"),
    "content": (b'{"messages": [{"role": "user", "content": ["hi"]}]}',
                "chats.jsonl line 3: a user's content is not a string"),
    "no reply": (b'{"messages": [{"role": "user", "content": "and you?"}]}', "chats.jsonl holds no assistant reply"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_file_of_conversations_is_one_line_naming_it_and_its_line_before_step_0(tmp_path, capsys, case):
    line, error = BAD[case]
    (tmp_path / "chats.jsonl").write_bytes(b'\n{"messages": [{"role": "user", "content": "hi"}]}\n' + line + b"\n")
    r = run_main(capsys, tmp_path, *CHAT, "--data", "chats.jsonl", "--max_steps", "1", "--log_dir", "log")
    assert r.returncode == 1 and r.stderr.startswith(f"train_gpt2.py: error: {error}") and r.stderr.count("\n") == 1
    assert not (tmp_path / "log").exists()  # before step 0: nothing written
