"""FSDP (--fsdp 1) on 2 gloo ranks, and activation checkpointing: DDP's losses over gradient accumulation, half the
state per rank, one checkpoint format for every layout (FSDP to DDP, to one process, to FSDP after a SIGTERM; DDP to
FSDP), compiled blocks, HellaSwag and sampling with uneven work; activation checkpointing keeps less, changes
nothing."""
import json
import os
import shutil
import signal

import pytest
import torch

from conftest import RUN, TINY, env_for_tests, env_with_sitecustomize, finish, hellaswag_dir, made_once, \
    make_examples, run_main, start, torchrun, torchrun_cmd, train_losses, wait_for_line
from test_resume import pid_of_rank
from train_gpt2 import GPT, GPTConfig

# B=2: two micro steps a rank, over the same 128 tokens a step as RUN's one (B=4): the same losses as DDP's and as one
# process's; HellaSwag on 17 examples: rank 0 scores 2 batches of 8, rank 1 one batch, unless every rank does as many
FSDP = [*RUN, "--B", "2", "--fsdp", "1", "--hellaswag", "1"]


def uneven_examples():
    return [dict(ex, ind=i) for i, ex in enumerate((make_examples() * 3)[:17])]


# FSDP's root handles a forward's inputs as it does on a GPU: there (not on a CPU) it moves them to the device with
# _to_kwargs, which rebuilds every list, tuple and dict it is given (a KV cache as a list: the blocks would fill a copy)
AS_ON_A_GPU = """
import torch
from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
_root_pre_forward = FSDPState._root_pre_forward
def _as_on_a_gpu(self, *args, **kwargs):
    backend_name = torch._C._get_privateuse1_backend_name
    torch._C._get_privateuse1_backend_name = lambda: "cpu"  # (its list of accelerators ends with this name)
    try:
        return _root_pre_forward(self, *args, **kwargs)
    finally:
        torch._C._get_privateuse1_backend_name = backend_name
FSDPState._root_pre_forward = _as_on_a_gpu
"""


@pytest.fixture(scope="session")
def fsdp_run(tmp_path_factory):
    """RUN under FSDP on 2 ranks with HellaSwag, its root's inputs handled as on a GPU: the yardstick of the FSDP
    tests."""
    def make(d):
        env = env_with_sitecustomize(AS_ON_A_GPU, d / "site",
                                     HELLASWAG_DIR=hellaswag_dir(d / "hellaswag", uneven_examples()))
        return torchrun(2, *FSDP, "--log_dir", d / "log", cwd=d, env=env)
    log, r = made_once(tmp_path_factory, "fsdp", make)
    assert r.returncode == 0 and "SIGABRT" not in r.stderr, r.stdout[-2000:] + r.stderr[-3000:]
    return log, r


def state_per_rank(stdout):
    return float(stdout.split("state per rank: ")[1].split(" GiB")[0])


def assert_losses_match(resumed, whole, abs=1e-5):
    assert sorted(resumed) == list(range(8, 24))
    for step, loss in resumed.items():
        assert loss == pytest.approx(whole[step], abs=abs), step


def test_fsdp_gives_ddps_losses_over_accumulation_steps(fsdp_run, ddp_run, shared_run):
    out = fsdp_run[1].stdout
    assert "device: cpu x 2; " in out and "; FSDP; " in out and "gradient accumulation steps: 2" in out
    fsdp, ddp, one = (train_losses(run[0]) for run in (fsdp_run, ddp_run, shared_run))
    assert sorted(fsdp) == list(range(24)) and fsdp[23] < fsdp[0] - 1
    for step in fsdp:  # (the same tokens in every step; only the order of the sums differs)
        assert fsdp[step] == pytest.approx(ddp[step], abs=1e-5) and fsdp[step] == pytest.approx(one[step], abs=1e-5)


def test_fsdp_holds_half_the_state_per_rank(fsdp_run, ddp_run):
    """Parameters, gradients and AdamW's moments, summed from each rank's local tensors: each rank holds 1/2 of DDP's
    (a shard's padding aside)."""
    ratio = state_per_rank(fsdp_run[1].stdout) / state_per_rank(ddp_run[1].stdout)
    assert 0.45 < ratio < 0.55


def test_one_process_holds_16_bytes_a_parameter(tmp_path, capsys):
    """float32 weights, gradients and AdamW's two moments: 4 + 4 + 8 bytes a parameter, in the log and the JSON."""
    r = run_main(capsys, tmp_path, *TINY, "--benchmark", "2", "--log_dir", "log")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    expected = 16 * info["n_params"] / 2**30  # (the step counters: a few bytes more)
    assert info["state_gib_per_rank"] == pytest.approx(expected, rel=1e-3)
    assert state_per_rank(r.stdout) == pytest.approx(expected, rel=1e-3) and info["fsdp"] is False


def test_hellaswag_and_sampling_under_fsdp_finish_with_uneven_work(fsdp_run):
    out = fsdp_run[1].stdout
    hella = [line for line in out.splitlines() if "| HellaSwag accuracy: " in line]
    assert len(hella) == 4 and all("/17=" in line for line in hella)  # steps 0, 8, 16, 24: every example, once
    assert all(out.count(f"rank {r} sample {i}: Hello, I'm a language model,") == 3 for r in (0, 1) for i in range(4))


def test_fsdp_samples_as_on_a_gpu_are_the_plain_models(fsdp_run):
    """The samples at step 24, from the sharded model with its root's inputs moved as on a GPU, equal the plain
    model's from the same weights (the checkpoint of step 24) and seeds (42 + rank)."""
    model = GPT.from_pretrained(str(fsdp_run[0] / "model_00024.pt"))
    out = fsdp_run[1].stdout.split("step    24 | val loss")[1]
    for rank in (0, 1):
        texts = model.generate_text("Hello, I'm a language model,", 4, 32, 42 + rank)
        assert [f"rank {rank} sample {i}: {text}" in out for i, text in enumerate(texts)] == [True] * 4, rank


def test_an_fsdp_checkpoint_is_one_file_in_the_format_one_process_writes(fsdp_run, shared_run):
    fsdp, one = (torch.load(run[0] / "model_00008.pt", weights_only=True) for run in (fsdp_run, shared_run))
    assert set(fsdp) == set(one) and fsdp["world_size"] == 2 and fsdp["args"]["fsdp"] == 1
    assert {k: v.shape for k, v in fsdp["model"].items()} == {k: v.shape for k, v in one["model"].items()}
    assert fsdp["optimizer"]["param_groups"] == one["optimizer"]["param_groups"]  # (parameters numbered alike)
    for i, state in one["optimizer"]["state"].items():
        assert {k: v.shape for k, v in fsdp["optimizer"]["state"][i].items()} == {k: v.shape for k, v in state.items()}
    assert sorted(p.name for p in fsdp_run[0].glob("model_*.pt")) == ["model_00008.pt", "model_00016.pt",
                                                                       "model_00024.pt"]


@pytest.mark.parametrize("under", ["DDP with activation checkpointing", "one process"])
def test_an_fsdp_checkpoint_resumes_under_ddp_and_on_one_process(tmp_path, fsdp_run, under, capsys):
    (tmp_path / "log").mkdir()
    shutil.copy(fsdp_run[0] / "model_00008.pt", tmp_path / "log")
    if under == "one process":  # (the checkpoint's --fsdp 1: nothing to shard here, and it says so)
        r = run_main(capsys, tmp_path, "--resume", "auto", "--hellaswag", "0")
        assert r.returncode == 0, r.stderr
        assert "; one process (nothing to shard); " in r.stdout
    else:
        r = torchrun(2, "--resume", "auto", "--hellaswag", "0", "--fsdp", "0", "--activation_checkpointing", "1",
                     cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "; DDP; activation checkpointing: True" in r.stdout
    assert "resumed from log/model_00008.pt at step 8 (written by 2 processes)" in r.stdout
    assert_losses_match(train_losses(tmp_path / "log"), train_losses(fsdp_run[0]))


def test_sigterm_under_fsdp_checkpoints_and_the_run_resumes_exactly(tmp_path, fsdp_run):
    flags = [*FSDP, "--hellaswag", "0", "--log_dir", "log"]  # (HellaSwag takes no step of its own: the same losses)
    launcher = start(torchrun_cmd(2, *flags), cwd=tmp_path)
    wait_for_line(launcher, "step     9 | loss")
    os.kill(pid_of_rank(launcher, 1), signal.SIGTERM)  # one rank is told; both stop after the same step
    out = finish(launcher)
    line = [ln for ln in out.splitlines() if ln.startswith("stopped by SIGTERM after step")]
    assert len(line) == 1 and "SIGABRT" not in out, out[-3000:]  # (torchrun reports the 143 with a traceback)
    step = int(line[0].split("after step ")[1].split(":")[0])
    assert sorted(p.name for p in (tmp_path / "log").glob("model_*.pt"))[-1] == f"model_{step + 1:05d}.pt"
    r = torchrun(2, *flags, "--resume", "auto", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    whole = train_losses(fsdp_run[0])
    assert train_losses(tmp_path / "log") == whole  # to the printed digits
    a, b = (torch.load(d / "model_00024.pt", weights_only=True) for d in (fsdp_run[0], tmp_path / "log"))
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for i, s in a["optimizer"]["state"].items()
               for k, v in s.items())


RECORD_COMPILES = """
import os, torch
_compile = torch.compile
def _cheap(model=None, **kwargs):  # aot_eager: the graphs torch.compile captures, run eagerly; and a note of what
    with open(os.path.join(os.environ["COMPILED"], str(os.getpid())), "a") as f:
        f.write(type(getattr(model, "__self__", model)).__name__ + "\\n")
    kwargs["backend"] = "aot_eager"
    return _compile(model, **kwargs)
torch.compile = _cheap
"""


@pytest.fixture(scope="session")
def fsdp_from_ddp(tmp_path_factory, ddp_run):
    """ddp_run's checkpoint at step 8 resumed under FSDP, its blocks compiled and checkpointed."""
    def make(d):
        (d / "log").mkdir()
        (d / "compiled").mkdir()
        shutil.copy(ddp_run[0] / "model_00008.pt", d / "log")
        env = env_with_sitecustomize(RECORD_COMPILES, d / "site", COMPILED=d / "compiled")
        return torchrun(2, "--resume", "auto", "--fsdp", "1", "--compile", "1", "--activation_checkpointing", "1",
                        cwd=d, env=env)
    log, r = made_once(tmp_path_factory, "fsdp-from-ddp", make)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return log.parent, r


def test_a_ddp_checkpoint_resumes_under_fsdp_with_compiled_checkpointed_blocks(fsdp_from_ddp, ddp_run):
    d, r = fsdp_from_ddp
    assert "compile: True; FSDP; activation checkpointing: True" in r.stdout
    assert_losses_match(train_losses(d / "log"), train_losses(ddp_run[0]))


def test_fsdp_compiles_each_block_before_sharding_it(fsdp_from_ddp):
    d = fsdp_from_ddp[0] / "compiled"
    compiled = [(d / name).read_text().split() for name in os.listdir(d)]
    assert sorted(map(sorted, compiled)) == [["Block", "Block"]] * 2  # each rank: its n_layer=2 blocks, nothing else


def test_activation_checkpointing_gives_the_same_loss_and_gradients_and_keeps_less():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=64, n_layer=3, n_head=2, n_embd=32))  # (the blocks dominate)
    x = torch.randint(0, 64, (2, 64))
    results = {}
    for ac in (False, True):
        model.zero_grad()
        model.activation_checkpointing = ac
        kept = {}

        def pack(t):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x, x)[1]
        loss.backward()
        results[ac] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(kept.values())
    (loss, grads, kept), (loss_ac, grads_ac, kept_ac) = results[False], results[True]
    assert loss_ac == pytest.approx(loss, abs=1e-6)
    assert all(torch.allclose(grads_ac[n], g, rtol=0, atol=1e-6) for n, g in grads.items())
    assert kept_ac < kept / 2  # (what autograd keeps for backward: the blocks' activations are recomputed)
