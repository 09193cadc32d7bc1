"""Tests of hellaswag.py on small HellaSwag-format files written here, with tiny random models (CPU only)."""

import functools
import http.server
import json
import os
import re
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hellaswag
from conftest import run_script
from gpt2_tokenizer import get_encoding
from train_gpt2 import GPT, GPTConfig

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once

WORDS = ("a man woman dog is are was holds takes walks runs throws the ball into water over field then "
         "slowly quickly and with his her red blue small large kitchen knife cuts bread").split()


def _text(n, seed):
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(n))


def make_examples():
    """Eight examples: endings of very different lengths (so summed and mean loss disagree), one context long
    enough that its rows pass 64 tokens (two length buckets), and labels on every position."""
    lengths = [(6, (2, 9, 4, 14)), (12, (7, 3, 11, 5)), (70, (5, 12, 3, 8)), (9, (15, 2, 6, 10)),
               (4, (3, 3, 12, 6)), (20, (9, 13, 2, 7)), (15, (4, 10, 6, 2)), (8, (11, 5, 8, 3))]
    return [{"ind": k, "ctx": _text(n_ctx, k).capitalize(), "label": k % 4,
             "endings": [_text(n, k * 4 + j + 1) + "." for j, n in enumerate(ends)]}
            for k, (n_ctx, ends) in enumerate(lengths)]


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "hellaswag"
    write_jsonl(d / "hellaswag_val.jsonl", make_examples())
    return d


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=128, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)).eval()


def tiny_hf_dir(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        activation_function="gelu_new", initializer_range=0.2)
    model = GPT2LMHeadModel(config).eval()
    path = tmp_path / "tiny-hf"
    model.save_pretrained(path)
    return model, path


def independent_counts(model_hf, examples):
    """acc_norm and acc counts computed from transformers' logits, with nothing from hellaswag.py: each ending is
    scored on its own, unpadded, as the average and the sum of -log p over its tokens."""
    enc = get_encoding()
    num_norm = num = 0
    for ex in examples:
        ctx = enc.encode(ex["ctx"])
        sums, means = [], []
        for ending in ex["endings"]:
            end = enc.encode(" " + ending)
            ids = torch.tensor([ctx + end])
            with torch.no_grad():
                logprobs = F.log_softmax(model_hf(ids).logits[0].double(), dim=-1)
            nll = [-logprobs[len(ctx) + j - 1, t].item() for j, t in enumerate(end)]
            sums.append(sum(nll))
            means.append(sum(nll) / len(nll))
        num_norm += int(min(range(4), key=means.__getitem__) == ex["label"])
        num += int(min(range(4), key=sums.__getitem__) == ex["label"])
    return num_norm, num


def clean_env(data_dir, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY",
                                                            "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")}
    env.update(HELLASWAG_DIR=str(data_dir), HELLASWAG_URL=UNREACHABLE + "/hellaswag_{split}.jsonl",
               HF_ENDPOINT=UNREACHABLE, **extra)
    return env


def run_cli(args, env, cwd):
    return run_script("hellaswag.py", *args, cwd=cwd, env=env, timeout=300)


@pytest.fixture
def offline(monkeypatch):
    """Neither source reachable: the GitHub URL and the hub both refuse connections."""
    for k in ("HF_HUB_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HELLASWAG_URL", UNREACHABLE + "/hellaswag_{split}.jsonl")
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    monkeypatch.delenv("HELLASWAG_HF_DATASET", raising=False)


# -- rendering and scoring ---------------------------------------------------------------------------------------


def test_render_example_puts_context_then_space_ending_and_masks_the_ending():
    enc = get_encoding()
    ex = {"ctx": "A man is sitting on a roof. he", "label": 3,
          "endings": ["is using wrap to wrap a pair of skis.", "starts pulling up roofing.", "sits.", "runs off."]}
    data, tokens, mask, label = hellaswag.render_example(ex)
    ctx = enc.encode(ex["ctx"])
    ends = [enc.encode(" " + e) for e in ex["endings"]]
    L = len(ctx) + max(len(e) for e in ends)
    assert label == 3 and data["label"] == 3
    assert data["ctx_tokens"] == ctx and data["ending_tokens"] == ends
    assert tokens.shape == mask.shape == (4, L) and tokens.dtype == mask.dtype == torch.long
    for i, end in enumerate(ends):
        pad = L - len(ctx) - len(end)
        assert tokens[i].tolist() == ctx + end + [0] * pad
        assert mask[i].tolist() == [0] * len(ctx) + [1] * len(end) + [0] * pad


def test_batched_scores_equal_one_example_at_a_time_in_fp32():
    model = tiny_gpt()
    examples = [hellaswag.tokenize_example(ex) for ex in make_examples()]
    one_sums, one_means = hellaswag.score_one_by_one(model, examples, "cpu")
    # 3 per forward: batches of mixed lengths, and a last batch that is not full
    sums, means = hellaswag.score(model, examples, "cpu", batch_size=3)
    torch.testing.assert_close(sums, one_sums, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(means, one_means, rtol=1e-5, atol=1e-5)
    assert means.argmin(1).tolist() == one_means.argmin(1).tolist()
    assert sums.argmin(1).tolist() == one_sums.argmin(1).tolist()


def test_evaluate_counts_match_transformers_gpt2(tmp_path, data_dir):
    model_hf, path = tiny_hf_dir(tmp_path)
    examples = make_examples()
    expected = independent_counts(model_hf, examples)
    assert expected[0] != expected[1], "the data should tell acc from acc_norm"
    model = GPT.from_pretrained(str(path))
    assert hellaswag.evaluate(model, "cpu", data_dir=str(data_dir), batch_size=4) == (*expected, len(examples))


def test_cli_final_line_reports_acc_and_acc_norm_of_a_transformers_directory(tmp_path, data_dir):
    model_hf, path = tiny_hf_dir(tmp_path)
    examples = make_examples()
    num_norm, num = independent_counts(model_hf, examples)
    r = run_cli(["-m", str(path), "-d", "cpu"], clean_env(data_dir), tmp_path)
    assert r.returncode == 0, r.stderr
    n = len(examples)
    assert r.stdout.strip().splitlines()[-1] == f"{n} acc: {num / n:.4f} acc_norm: {num_norm / n:.4f}"


# -- distributed and compiled ------------------------------------------------------------------------------------


def _rank_worker(rank, world_size, init_file, data_dir, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        counts = hellaswag.evaluate(tiny_gpt(), "cpu", rank=rank, world_size=world_size, data_dir=data_dir,
                                    batch_size=2)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(counts))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_same_counts_as_one(tmp_path, data_dir):
    # 7 examples: the ranks get 4 and 3
    write_jsonl(data_dir / "hellaswag_val.jsonl", make_examples()[:7])
    single = hellaswag.evaluate(tiny_gpt(), "cpu", data_dir=str(data_dir), batch_size=2)
    torch.multiprocessing.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(data_dir), str(tmp_path)),
                                nprocs=2, join=True)
    for rank in range(2):
        assert tuple(json.loads((tmp_path / f"rank{rank}.json").read_text())) == single
    assert single[2] == 7


def test_compiled_model_with_inductor_matches_eager_on_cpu():
    model = tiny_gpt()
    examples = [hellaswag.tokenize_example(ex) for ex in make_examples()]
    examples = [ex for ex in examples if hellaswag._example_len(ex) <= hellaswag.BUCKET][:4]  # one graph
    eager_sums, eager_means = hellaswag.score(model, examples, "cpu", batch_size=4)
    compiled = torch.compile(model)  # inductor, as train_gpt2.py compiles
    sums, means = hellaswag.score(compiled, examples, "cpu", batch_size=4)
    torch.testing.assert_close(sums, eager_sums, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(means, eager_means, rtol=1e-4, atol=1e-4)


class CountingBackend:
    """A torch.compile backend that runs graphs eagerly and records, per compilation, whether it was dynamic."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(any(not isinstance(x, torch.Tensor) for x in example_inputs))  # SymInt inputs: dynamic
        return gm.forward


def test_compiled_eval_builds_one_static_graph_per_length_bucket_and_reuses_them(data_dir):
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(tiny_gpt(), backend=backend)
    lengths = {-(-hellaswag._example_len(hellaswag.tokenize_example(ex)) // hellaswag.BUCKET)
               for ex in make_examples()}
    assert len(lengths) == 2  # the data spans two buckets
    evaluate = functools.partial(hellaswag.evaluate, compiled, "cpu", data_dir=str(data_dir), batch_size=2,
                                 compile_backend=backend)
    first = evaluate()
    assert backend.graphs == [False, False]  # one static graph per bucket, however many examples
    assert evaluate() == first
    assert len(backend.graphs) == 2  # the next evaluation compiles nothing


def test_compiled_eval_leaves_the_training_graph_static(data_dir):
    # train_gpt2.py's order at step 0: val loss (eval mode), HellaSwag, then the first training step
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(tiny_gpt(), backend=backend)
    x = torch.randint(0, 50257, (2, 16))
    compiled.eval()
    with torch.no_grad():
        compiled(x, x)
    hellaswag.evaluate(compiled, "cpu", data_dir=str(data_dir), batch_size=2, compile_backend=backend)
    compiled.train()
    n = len(backend.graphs)
    compiled(x, x)[1].backward()
    assert backend.graphs[n:] == [False]  # the training step got a static graph of its own


# -- data: download, fallbacks, errors ---------------------------------------------------------------------------


@pytest.fixture
def http_dir(tmp_path):
    """A local HTTP server for a directory of files; yields (directory, base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_download_fetches_the_jsonl_from_the_url(tmp_path, http_dir, offline):
    served, base = http_dir
    source = write_jsonl(served / "hellaswag_val.jsonl", make_examples())
    path = hellaswag.download("val", str(tmp_path / "cache"), url=base + "/hellaswag_{split}.jsonl", progress=False)
    assert path == str(tmp_path / "cache" / "hellaswag_val.jsonl")
    assert Path(path).read_bytes() == source.read_bytes()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["hellaswag_val.jsonl"]  # no temp file left


def test_download_falls_back_to_the_hugging_face_dataset_with_string_labels(tmp_path, offline):
    import datasets
    rows = [dict(ex, label=str(ex["label"])) for ex in make_examples()]  # as on the hub: label is a string
    hub_copy = tmp_path / "hub-copy"
    (hub_copy / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(str(hub_copy / "data" / "validation-00000-of-00001.parquet"))
    path = hellaswag.download("val", str(tmp_path / "cache"), hf_dataset=str(hub_copy), progress=False)
    written = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert written == make_examples()  # same records, label back to an int


def test_evaluate_raises_hellaswag_unavailable_when_no_source_is_reachable(tmp_path, offline):
    with pytest.raises(hellaswag.HellaSwagUnavailable, match=r"could not get hellaswag_val\.jsonl from GitHub"):
        hellaswag.evaluate(tiny_gpt(), "cpu", data_dir=str(tmp_path / "empty"))
    assert not (tmp_path / "empty" / "hellaswag_val.jsonl").exists()


def test_cli_exits_with_a_one_line_error_when_no_source_is_reachable(tmp_path):
    r = run_cli(["-m", "gpt2", "-d", "cpu"], clean_env(tmp_path / "empty"), tmp_path)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert re.fullmatch(r"hellaswag: error: could not get hellaswag_val\.jsonl from GitHub \(.+\) nor "
                        r"Rowan/hellaswag on the Hugging Face hub \(.+\); put the file at .*hellaswag_val\.jsonl",
                        lines[-1]), r.stderr
    assert "Traceback" not in r.stderr


def test_cli_names_the_line_number_of_a_malformed_line(tmp_path, data_dir):
    lines = (data_dir / "hellaswag_val.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-1]  # line 3 loses its closing brace
    (data_dir / "hellaswag_val.jsonl").write_text("\n".join(lines) + "\n")
    r = run_cli(["-m", "gpt2", "-d", "cpu"], clean_env(data_dir), tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith(
        f"hellaswag: error: {data_dir / 'hellaswag_val.jsonl'} line 3: not valid JSON"), r.stderr


def test_cli_reports_an_unknown_model_in_one_line(tmp_path, data_dir):
    r = run_cli(["-m", str(tmp_path / "no-such-model"), "-d", "cpu"], clean_env(data_dir), tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith(f"hellaswag: error: no model '{tmp_path / 'no-such-model'}'")
    assert "Traceback" not in r.stderr


def test_training_warns_once_and_goes_on_when_hellaswag_is_unavailable(tmp_path):
    text = tmp_path / "input.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 300)
    args = ["--data", str(text), "--log_dir", str(tmp_path / "log"), "--device", "cpu", "--B", "2", "--T", "16",
            "--total_batch_size", "32", "--n_layer", "1", "--n_head", "1", "--n_embd", "16", "--block_size", "16",
            "--max_steps", "2", "--eval_interval", "1", "--val_steps", "1", "--warmup_steps", "1",
            "--hellaswag", "1", "--compile", "0"]
    r = run_script("train_gpt2.py", *args, cwd=tmp_path, env=clean_env(tmp_path / "empty"), timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("warning: HellaSwag is unavailable, training goes on without it") == 1
    assert "step     1" in r.stdout and (tmp_path / "log" / "model_00002.pt").exists()
