"""hellaswag.py on small HellaSwag-format files written here, with tiny random models (CPU only)."""
import functools
import hashlib
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hellaswag
from conftest import REPO, TINY, hellaswag_dir, make_examples, offline_env, read_log, run_main, run_script, \
    write_jsonl
from gpt2_tokenizer import get_encoding
from train_gpt2 import GPT, GPTConfig

@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    d = hellaswag_dir(tmp_path / "hellaswag", make_examples())
    monkeypatch.setenv("HELLASWAG_DIR", str(d))
    return d


def tiny_gpt(block_size=128, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)).eval()


def tiny_hf_dir(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                       initializer_range=0.2)).eval()
    model.save_pretrained(tmp_path / "tiny-hf")
    return model, tmp_path / "tiny-hf"


def independent_counts(model_hf, examples, window=None):
    """acc_norm and acc counts from transformers' logits, with nothing from hellaswag.py: each ending scored on its
    own, unpadded, as the mean and the sum of -log p over its tokens; with a window, as lm-evaluation-harness does
    (the last window+1 tokens, the model fed all but the last)."""
    enc = get_encoding()
    num_norm = num = 0
    for ex in examples:
        sums, means = [], []
        for ending in ex["endings"]:
            ctx, end = enc.encode(ex["ctx"]), enc.encode(" " + ending)
            ids = (ctx + end)[-(window + 1):] if window else ctx + end
            with torch.no_grad():
                logprobs = F.log_softmax(model_hf(torch.tensor([ids[:-1]])).logits[0].double(), dim=-1)
            nll = [-logprobs[len(ids) - len(end) + j - 1, t].item() for j, t in enumerate(end)]
            sums.append(sum(nll))
            means.append(sum(nll) / len(nll))
        num_norm += int(min(range(4), key=means.__getitem__) == ex["label"])
        num += int(min(range(4), key=sums.__getitem__) == ex["label"])
    return num_norm, num


# -- rendering and scoring ---------------------------------------------------------------------------------------


def test_render_example_puts_context_then_space_ending_and_masks_the_ending():
    enc = get_encoding()
    ex = {"ctx": "A man is sitting on a roof. he", "label": 3,
          "endings": ["is using wrap to wrap a pair of skis.", "starts pulling up roofing.", "sits.", "runs off."]}
    data, tokens, mask, label = hellaswag.render_example(ex)
    ctx, ends = enc.encode(ex["ctx"]), [enc.encode(" " + e) for e in ex["endings"]]
    L = len(ctx) + max(len(e) for e in ends)
    assert label == 3 and data["ctx_tokens"] == ctx and data["ending_tokens"] == ends
    assert tokens.shape == mask.shape == (4, L) and tokens.dtype == mask.dtype == torch.long
    for i, end in enumerate(ends):
        pad = L - len(ctx) - len(end)
        assert tokens[i].tolist() == ctx + end + [0] * pad
        assert mask[i].tolist() == [0] * len(ctx) + [1] * len(end) + [0] * pad


def test_batched_scores_equal_the_lectures_loop_one_example_at_a_time():
    model = tiny_gpt()
    examples = make_examples()
    losses = hellaswag.score(model, examples, "cpu", batch_size=3)  # batches of mixed lengths, the last not full
    for i, ex in enumerate(examples):  # the lecture's loop: one example per forward pass, loss at every position
        _, tokens, mask, _ = hellaswag.render_example(ex)
        with torch.no_grad():
            logits = model(tokens)[0]
        row = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view(4, -1)
        summed = (row * mask[:, 1:]).sum(1)
        torch.testing.assert_close(losses[0, i], summed, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(losses[1, i], summed / mask[:, 1:].sum(1), rtol=1e-5, atol=1e-5)
        assert losses[1, i].argmin().item() == hellaswag.get_most_likely_row(tokens[:, :], mask, logits[:, :-1])


def test_evaluate_counts_match_transformers_gpt2(tmp_path):
    model_hf, path = tiny_hf_dir(tmp_path)
    examples = make_examples()
    expected = independent_counts(model_hf, examples)
    assert expected[0] != expected[1]  # the data tells acc from acc_norm
    assert hellaswag.evaluate(GPT.from_pretrained(str(path)), examples, "cpu", batch_size=4) == (*expected, 8)


def test_acc_takes_the_lowest_summed_loss_and_acc_norm_the_lowest_mean_loss():
    """An example where the two disagree, by hand: ending 0 is one token of loss 2.0 (sum 2, mean 2), ending 1 four
    tokens of loss 1.0 (sum 4, mean 1), endings 2 and 3 tokens of loss 5.0. The label is 1: acc_norm is right, acc
    is not."""
    example = {"ctx": "The man opened the door and", "label": 1,
               "endings": ["left", "saw the red ball", "then he walked", "went into it"]}
    _, tokens, mask, _ = hellaswag.render_example(example)
    assert mask.sum(1).tolist()[:2] == [1, 4]  # (" left": one token; " saw the red ball": four)
    loss = torch.tensor([2.0, 1.0, 5.0, 5.0]).view(4, 1).expand(4, tokens.size(1) - 1)
    V = 50304  # every other token's logit 0, the target's b: its loss log(e^b + V - 1) - b is the row's
    boost = torch.log((V - 1) * torch.exp(-loss) / (1 - torch.exp(-loss)))

    def model(inputs):  # the logits of the rows evaluate scores: (4, L - 1, V)
        assert torch.equal(inputs, tokens[:, :-1])
        return torch.zeros(4, tokens.size(1) - 1, V).scatter(2, tokens[:, 1:].unsqueeze(-1), boost.unsqueeze(-1))
    sums, means = hellaswag.ending_losses(tokens, mask, model(tokens[:, :-1]))
    assert sums[:2].tolist() == pytest.approx([2, 4], abs=1e-3) and min(sums[2:]) > 4
    assert means[:2].tolist() == pytest.approx([2, 1], abs=1e-3) and min(means[2:]) > 2
    assert hellaswag.evaluate(model, [example], "cpu", batch_size=1) == (1, 0, 1)  # (acc_norm's count, acc's, total)


def test_rows_longer_than_the_context_are_scored_as_lm_evaluation_harness_does(tmp_path):
    model_hf, path = tiny_hf_dir(tmp_path)
    examples = make_examples()  # rows of up to ~95 tokens, against a context of 24
    expected = independent_counts(model_hf, examples, window=24)
    model = GPT.from_pretrained(str(path))
    assert hellaswag.evaluate(model, examples, "cpu", block_size=24, batch_size=3) == (*expected, 8)


def test_each_batch_goes_to_the_host_once(monkeypatch):
    copies = []
    cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: copies.append(1) or cpu(self, *a, **k))
    hellaswag.score(tiny_gpt(), make_examples(), "cpu", batch_size=3)
    assert len(copies) == 3  # 8 examples, 3 a batch


def test_two_gloo_ranks_give_the_same_counts_as_one(tmp_path):
    examples = make_examples()[:7]  # the ranks get 4 and 3
    single = hellaswag.evaluate(tiny_gpt(), examples, "cpu", batch_size=2)
    torch.multiprocessing.spawn(rank_worker, args=(2, str(tmp_path / "init"), examples, str(tmp_path)), nprocs=2)
    for rank in range(2):
        assert tuple(json.loads((tmp_path / f"rank{rank}.json").read_text())) == single
    assert single[2] == 7


def rank_worker(rank, world_size, init_file, examples, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    counts = hellaswag.evaluate(tiny_gpt(), examples, "cpu", rank, world_size, batch_size=2)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(counts))
    dist.destroy_process_group()


# -- compiled ----------------------------------------------------------------------------------------------------


def test_the_batch_scorer_compiles_into_one_graph_without_breaks():
    torch._dynamo.reset()
    _, tokens, mask = next(hellaswag.batches(make_examples(), 2, 128, fixed_shapes=True))
    explanation = torch._dynamo.explain(hellaswag.score_batch)(tiny_gpt(), tokens, mask)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_compiled_scoring_matches_eager():
    """The compiled path's padded, bucketed batches score as the eager path does (aot_eager: the graph torch.compile
    captures, traced by AOTAutograd and run eagerly; inductor's code generation would cost 10 s here)."""
    model = tiny_gpt()
    examples = [ex for ex in make_examples() if ex["ind"] != 2][:4]  # one length bucket: one graph to build
    torch.testing.assert_close(hellaswag.score(model, examples, "cpu", 4, compile="aot_eager"),
                               hellaswag.score(model, examples, "cpu", 4), rtol=1e-4, atol=1e-3)


class CountingBackend:
    """A torch.compile backend that runs graphs eagerly and records, per compilation, whether it was dynamic."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(any(not isinstance(x, torch.Tensor) for x in example_inputs))  # SymInt inputs: dynamic
        return gm.forward


def test_compiled_eval_builds_one_static_graph_per_length_bucket_and_reuses_them():
    torch._dynamo.reset()
    backend = CountingBackend()
    evaluate = functools.partial(hellaswag.evaluate, tiny_gpt(), make_examples(), "cpu", block_size=128,
                                 compile=backend, batch_size=2)
    first = evaluate()
    assert backend.graphs == [False, False]  # one static graph per bucket (2 here), however many examples
    assert evaluate() == first and len(backend.graphs) == 2  # the next evaluation compiles nothing


def test_compiled_eval_leaves_the_training_graph_static():
    # train_gpt2.py's order at step 0: val loss (eval mode), HellaSwag, then the first training step
    torch._dynamo.reset()
    backend = CountingBackend()
    model = tiny_gpt()
    compiled = torch.compile(model, backend=backend)
    x = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        compiled(x, x)
    hellaswag.evaluate(model, make_examples(), "cpu", block_size=128, compile=backend, batch_size=2)
    compiled.train()
    n = len(backend.graphs)
    compiled(x, x)[1].backward()
    assert backend.graphs[n:] == [False]  # the training step got a static graph of its own


# -- the data: download, checks, fallback ------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path):
    """A local HTTP server for a directory of files: (directory, base URL, the paths it was asked for)."""
    served, asked = tmp_path / "served", []
    served.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args):
            asked.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}", asked
    httpd.shutdown()
    httpd.server_close()


def test_download_keeps_a_file_of_valid_examples(tmp_path, server, monkeypatch):
    served, base, _ = server
    monkeypatch.setenv("HELLASWAG_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hellaswag, "DATA_URL", base + "/hellaswag_{split}.jsonl")
    source = write_jsonl(served / "hellaswag_train.jsonl", make_examples())
    assert list(hellaswag.iterate_examples("train")) == make_examples()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["hellaswag_train.jsonl"]  # and no temporary file
    assert (tmp_path / "cache" / "hellaswag_train.jsonl").read_bytes() == source.read_bytes()


def test_a_val_download_that_is_not_the_lectures_file_is_fetched_again_and_never_kept(tmp_path, server, monkeypatch):
    served, base, asked = server
    monkeypatch.setenv("HELLASWAG_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # and the hub refuses connections
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hellaswag, "DATA_URL", base + "/hellaswag_{split}.jsonl")
    write_jsonl(served / "hellaswag_val.jsonl", make_examples())  # valid examples, but not the 10,042 of the lecture
    blob = "0f5ee25d72216f12317d5d8a7b92deafa423d81e"  # the lecture's file
    with pytest.raises(hellaswag.HellaSwagUnavailable, match=f"git blob id .* not {blob}"):
        list(hellaswag.iterate_examples("val"))
    assert asked == ["/hellaswag_val.jsonl"] * 2  # fetched twice
    assert list((tmp_path / "cache").iterdir()) == []  # and not kept


def test_the_blob_id_is_gits():
    data = b"hello world\n"
    assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == "3b18e512dba79e4c8300dd08aeb37f8e728b8dad"


def hub_copy(tmp_path, n):
    """A local copy of the Hugging Face data set's validation split: n examples, the label a string."""
    import datasets
    rows = [dict(ex, ind=i, label=str(ex["label"])) for i, ex in enumerate((make_examples() * 1300)[:n])]
    (tmp_path / "hub" / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "hub" / "data" / "validation-00000-of-00001.parquet"))
    return str(tmp_path / "hub")


@pytest.mark.parametrize("n", [10042, 8])
def test_the_hugging_face_copy_is_checked_by_its_example_count(tmp_path, monkeypatch, n):
    monkeypatch.setenv("HELLASWAG_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hellaswag, "DATA_URL", "http://127.0.0.1:9/hellaswag_{split}.jsonl")  # GitHub: refused
    monkeypatch.setattr(hellaswag, "HF_DATASET", hub_copy(tmp_path, n))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # (a local copy: datasets needs no network)
    if n == 8:
        with pytest.raises(hellaswag.HellaSwagUnavailable, match="it has 8 examples, not 10042"):
            list(hellaswag.iterate_examples("val"))
        assert list((tmp_path / "cache").iterdir()) == []
    else:
        examples = list(hellaswag.iterate_examples("val"))
        assert len(examples) == 10042 and examples[:8] == [dict(ex, ind=i) for i, ex in enumerate(make_examples())]


@pytest.mark.parametrize("bad, message", [(b'{"ctx": "a", "endings": ["b", "c", "d"', "JSONDecodeError"),
                                          (b'{"ctx": "caf\xe9"}', "UnicodeDecodeError")])
def test_a_bad_line_is_named(data_dir, bad, message):
    lines = (data_dir / "hellaswag_val.jsonl").read_bytes().splitlines()
    lines[2] = bad
    (data_dir / "hellaswag_val.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    expected = rf"val.jsonl line 3 is not a HellaSwag example \({message}"
    with pytest.raises(hellaswag.HellaSwagUnavailable, match=expected):
        list(hellaswag.iterate_examples("val"))


# -- the command line, and in training ---------------------------------------------------------------------------


def test_cli_final_line_reports_acc_and_acc_norm_of_a_transformers_directory(tmp_path, data_dir, capsys):
    model_hf, path = tiny_hf_dir(tmp_path)
    num_norm, num = independent_counts(model_hf, make_examples())
    hellaswag.main(["-m", str(path), "-d", "cpu"])  # (in this process: no second import of transformers)
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"8 acc: {num / 8:.4f} acc_norm: {num_norm / 8:.4f}"


def test_cli_sends_a_checkpoint_to_eval_only_and_never_imports_train_gpt2(tmp_path, shared_run):
    code = ("import runpy, sys\n"
            "sys.argv = sys.argv[1:]\n"
            "try:\n"
            "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "finally:\n"
            "    print('train_gpt2 imported:', 'train_gpt2' in sys.modules)\n")
    ckpt = shared_run[0] / "model_00024.pt"
    r = subprocess.run([sys.executable, "-c", code, str(REPO / "hellaswag.py"), "-m", str(ckpt), "-d", "cpu"],
                       capture_output=True, text=True, env=offline_env(tmp_path), timeout=120)
    assert r.returncode == 1 and r.stdout == "train_gpt2 imported: False\n"
    assert r.stderr == (f"hellaswag.py: error: {ckpt} is a file, not a transformers model: score a checkpoint with "
                        f"python train_gpt2.py --eval_only --hellaswag 1 --init_from FILE\n")


@pytest.mark.parametrize("case", ["no data and no network", "a bad line", "an unknown model"])
def test_cli_errors_are_one_line(tmp_path, data_dir, case):
    model = "gpt2" if case != "an unknown model" else str(tmp_path / "no-such-model")
    if case == "no data and no network":
        (data_dir / "hellaswag_val.jsonl").unlink()
    if case == "a bad line":
        with open(data_dir / "hellaswag_val.jsonl", "a") as f:
            f.write("{not json\n")
    r = run_script("hellaswag.py", "-m", model, "-d", "cpu", env=offline_env(tmp_path, HELLASWAG_DIR=data_dir))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("hellaswag.py: error: ") and {
        "no data and no network": "could not get hellaswag_val.jsonl (https://raw.githubusercontent.com/rowanz/",
        "a bad line": "hellaswag_val.jsonl line 9 is not a HellaSwag example",
        "an unknown model": f"could not load {model} (cannot connect to huggingface.co"}[case] in line, line


def test_cli_limit_and_batch_size_of_0_are_refused_first(capsys):
    for flag in ("--limit", "--batch_size"):
        with pytest.raises(SystemExit):
            hellaswag.main([flag, "0", "-d", "cpu"])  # (before any download or model)
        assert capsys.readouterr().err == "hellaswag.py: error: --limit and --batch_size must be positive\n"


def test_training_logs_hellaswag_in_the_lectures_format(tmp_path, data_dir, capsys):
    r = run_main(capsys, tmp_path, *TINY, "--hellaswag", "1", "--max_steps", "4", "--eval_interval", "2",
                 "--log_dir", "log")  # (HELLASWAG_DIR: data_dir's file, no download)
    assert r.returncode == 0, r.stderr
    hella = {k[0]: v for k, v in read_log(tmp_path / "log" / "log.txt").items() if k[1] == "hella"}
    assert sorted(hella) == [0, 2, 4] and all(v in (f"{n / 8:.4f}" for n in range(9)) for v in hella.values())
    assert "step     2 | HellaSwag accuracy: " in r.stdout


@pytest.mark.parametrize("case", ["unavailable", "a bad line"])
def test_training_warns_once_and_goes_on_without_hellaswag(tmp_path, data_dir, case):
    if case == "unavailable":
        (data_dir / "hellaswag_val.jsonl").unlink()
    else:
        with open(data_dir / "hellaswag_val.jsonl", "ab") as f:
            f.write(b'{"ctx": "caf\xe9"}\n')
    r = run_script("train_gpt2.py", *TINY, "--hellaswag", "1", "--max_steps", "2", "--eval_interval", "1",
                   "--log_dir", "log", cwd=tmp_path, env=offline_env(tmp_path, HELLASWAG_DIR=data_dir))
    assert r.returncode == 0, r.stderr
    warnings = [ln for ln in r.stdout.splitlines() if ln.startswith("warning: HellaSwag is unavailable")]
    assert len(warnings) == 1 and warnings[0].index("warning") < r.stdout.index("step     0")  # before step 0
    assert ("line 9 is not a HellaSwag example" in warnings[0]) == (case == "a bad line")
    assert (tmp_path / "log" / "model_00002.pt").exists()
