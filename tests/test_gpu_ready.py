"""What decides speed on a GPU, checked on the CPU over the real training loop: reads from the device per step, the
memory a micro step keeps, DDP's settings, torch.compile's recompiles, the MFU figure, and the GPU path's own shape
(bfloat16 autocast with inductor) run for real. Each test runs train_gpt2.main in a subprocess with the library
patched to observe (never the program; the MFU test gives the peak table an entry for the CPU)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, RUN, TINY, env_for_tests, hellaswag_dir, make_examples, read_log, run_script, \
    tiny_flops_per_token, torchrun_cmd

OBSERVE = f"""
import json, sys, traceback, weakref
import torch
sys.path.insert(0, {str(REPO)!r})
import train_gpt2
events = []
class Lines:  # the step lines the loop prints, as markers between the events
    def __init__(self, out):
        self.out = out
    def write(self, text):
        if "| loss:" in text:
            events.append(["step", int(text.split("|")[0].split()[1])])
        return self.out.write(text)
    def flush(self):
        self.out.flush()
sys.stdout = Lines(sys.stdout)
"""


def observe(tmp_path, code, flags, env=None, launcher=None):
    script = tmp_path / "observe.py"
    script.write_text(OBSERVE + code + f"\ntrain_gpt2.main({[str(f) for f in flags]!r})\n"
                      "print('EVENTS ' + json.dumps(events), flush=True)\n")
    cmd = launcher or [sys.executable]
    r = subprocess.run([*cmd, str(script)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=300, env=env_for_tests(**(env or {})))  # (one stream: torch's logs stay in order)
    assert r.returncode == 0, r.stdout[-3000:]
    return r.stdout, json.loads(r.stdout.split("EVENTS ")[-1].splitlines()[0])


def per_step(events, kind):
    """{step: how many `kind` events came in that step (after the previous step's line, up to its own)}."""
    counts, n = {}, 0
    for event in events:
        if event[0] == "step":
            counts[event[1]], n = n, 0
        elif event[0] == kind:
            n += 1
    return counts


COUNT_READS = """
from torch.utils._python_dispatch import TorchDispatchMode
class Reads(TorchDispatchMode):  # .item(), float(t), bool(t): every read of one value from a tensor
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            # (the CPU AdamW reads its step counter, a host tensor on every device; fused AdamW on CUDA does not)
            if not any("torch/optim/" in frame.filename for frame in traceback.extract_stack()):
                events.append(["read", str(func)])
        return func(*args, **(kwargs or {}))
for name in ("tolist", "cpu", "numpy"):  # and whole tensors to the host
    def counted(self, *a, _orig=getattr(torch.Tensor, name), _name=name, **kw):
        events.append(["read", _name])
        return _orig(self, *a, **kw)
    setattr(torch.Tensor, name, counted)
Reads().__enter__()
"""


def test_a_steady_training_step_reads_from_the_device_once(tmp_path):
    _, events = observe(tmp_path, COUNT_READS, [*TINY, "--max_steps", "6", "--eval_interval", "100", "--log_dir",
                                                "log"])
    reads = per_step(events, "read")
    assert sorted(reads) == list(range(6))
    assert reads[0] > 1  # step 0 is preceded by the val loss (its .item()): the counter sees reads
    assert [reads[s] for s in range(1, 6)] == [1] * 5  # loss, norm and the stop flag: one copy per step


KEEP_LOGITS = """
previous = [None]
forward = train_gpt2.GPT.forward
def observed(self, idx, targets=None, cache=None):
    if self.training:  # is the previous micro step's logits tensor still alive as this forward starts?
        events.append(["alive" if previous[0] is not None and previous[0]() is not None else "freed"])
    logits, loss = forward(self, idx, targets, cache)
    if self.training:
        previous[0] = weakref.ref(logits)
    return logits, loss
train_gpt2.GPT.forward = observed
"""


def test_a_micro_step_does_not_keep_the_previous_logits_alive(tmp_path):
    _, events = observe(tmp_path, KEEP_LOGITS, [*TINY, "--total_batch_size", "256", "--max_steps", "3",
                                                "--log_dir", "log"])
    forwards = [e[0] for e in events if e[0] in ("alive", "freed")]
    assert len(forwards) == 3 * 4 and forwards[1:] == ["freed"] * 11  # 4 micro steps a step


WATCH_DDP = """
from torch.nn.parallel import DistributedDataParallel
init, forward = DistributedDataParallel.__init__, DistributedDataParallel.forward
def observed_init(self, *args, **kwargs):
    events.append(["ddp", {k: v for k, v in kwargs.items() if k != "device_ids"}])
    init(self, *args, **kwargs)
def observed_forward(self, *args, **kwargs):
    if self.training:
        events.append(["sync" if self.require_backward_grad_sync else "no sync"])
    return forward(self, *args, **kwargs)
DistributedDataParallel.__init__, DistributedDataParallel.forward = observed_init, observed_forward
"""


def test_ddp_syncs_gradients_on_the_last_micro_step_only_into_bucket_views(tmp_path):
    _, events = observe(tmp_path, WATCH_DDP, [*TINY, "--total_batch_size", "384", "--max_steps", "2", "--log_dir",
                                              "log"], launcher=torchrun_cmd(2)[:-1])
    assert ["ddp", {"gradient_as_bucket_view": True}] in events
    assert [e[0] for e in events if "sync" in e[0]] == ["no sync", "no sync", "sync"] * 2  # 3 micro steps a step


AOT_EAGER = """
compile = torch.compile
def cheap(model=None, **kwargs):  # every torch.compile of the run with the aot_eager backend: fast on a CPU
    kwargs["backend"] = "aot_eager"
    return compile(model, **kwargs)
torch.compile = cheap
"""


def test_a_compiled_run_does_not_recompile_after_its_first_eval_cycle(tmp_path):
    examples = [dict(ex, ind=i) for i, ex in enumerate(make_examples() * 2)]  # 2 batches of 8, rows to ~95 tokens
    data = hellaswag_dir(tmp_path / "hellaswag", examples)  # with block_size 128: two length buckets, two graphs
    out, _ = observe(tmp_path, AOT_EAGER, [*TINY, "--block_size", "128", "--compile", "1", "--hellaswag", "1",
                                         "--max_steps", "6", "--eval_interval", "2", "--log_dir", "log"],
                   env={"TORCH_LOGS": "recompiles", "HELLASWAG_DIR": data})
    lines = out.splitlines()
    assert "compile: True" in out and sum("hella" in ln for ln in open(tmp_path / "log" / "log.txt")) == 4
    first_cycle = [i for i, ln in enumerate(lines) if "sample 3:" in ln][0]  # step 2: val, HellaSwag, samples
    assert any("Recompiling" in ln for ln in lines[:first_cycle])  # (the log does show them: eval and train mode)
    assert [ln for ln in lines[first_cycle:] if "Recompiling" in ln] == []


def test_gpu_check_runs_its_cpu_mode_and_writes_the_table(tmp_path):
    """tools/gpu_check.py --cpu: the GPU check's every step (the benchmark runs through train_gpt2.py, on one process
    and under FSDP with activation checkpointing on two, the largest B, the HellaSwag timing on a small file in
    HellaSwag's format), reduced, so the script is known to work."""
    data = hellaswag_dir(tmp_path / "hellaswag", make_examples())
    r = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--cpu", "--out", "table.json"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env_for_tests(HELLASWAG_DIR=data))
    assert r.returncode == 0, r.stderr[-3000:]
    table = json.loads((tmp_path / "table.json").read_text())
    one, fsdp = table["rows"]
    assert one["B"] == 4 and one["compile"] is False and one["tok_per_sec"] > 0 and one["mfu"] is None
    assert (fsdp["world_size"], fsdp["fsdp"], fsdp["activation_checkpointing"]) == (2, True, True)
    assert 0.45 < fsdp["state_gib_per_rank"] / one["state_gib_per_rank"] < 0.55  # (each of 2 ranks: half the state)
    assert table["largest_B"] == {"compile 0": 4} and table["hellaswag_val"]["examples"] == 8
    assert "one  x1 B   4 compile 0   :" in r.stdout and "FSDP x2 B   4 compile 0 AC:" in r.stdout
    assert "largest B that fits: compile 0: 4" in r.stdout
    assert "HellaSwag val: 8 examples in" in r.stdout and "written to table.json" in r.stdout


PEAK_FOR_THE_CPU = """
train_gpt2.PEAK_FLOPS = {"cpu": 1e10}  # the one place to patch: a peak for this device's name
"""


def test_the_mfu_of_two_ranks_divides_their_tokens_per_second_by_the_world_size(tmp_path):
    out, _ = observe(tmp_path, PEAK_FOR_THE_CPU, [*TINY, "--dtype", "bfloat16", "--benchmark", "4", "--log_dir", "log"],
                     launcher=torchrun_cmd(2)[:-1])
    info = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    assert info["world_size"] == 2 and info["dtype"] == "bfloat16"
    flops_per_token = tiny_flops_per_token(info["n_params"])
    assert info["mfu"] == pytest.approx(flops_per_token * info["tok_per_sec"] / 2 / 1e10, rel=1e-3, abs=1e-4)
    steps = [ln for ln in out.splitlines() if "| loss:" in ln]
    assert len(steps) == 4  # (rank 0's)
    for line in steps:
        tok_per_sec, mfu = float(line.split("tok/sec: ")[1].split()[0]), float(line.split("mfu: ")[1].split("%")[0])
        assert mfu == pytest.approx(100 * flops_per_token * tok_per_sec / 2 / 1e10, abs=0.006)


def test_bfloat16_with_inductor_trains_resumes_exactly_and_keeps_to_the_float32_losses(tmp_path, shared_run):
    """The nearest the CPU gets to the GPU path: bfloat16 autocast, torch.compile with inductor (for real, the one test
    that pays for its code generation) and the compiled HellaSwag scorer, over the shared run's flags."""
    data = hellaswag_dir(tmp_path / "hellaswag", make_examples())  # (block_size 16: one row length, one graph)
    env = env_for_tests(HELLASWAG_DIR=data, TORCHINDUCTOR_CACHE_DIR=tmp_path / "inductor-cache")
    whole = run_script("train_gpt2.py", *RUN, "--dtype", "bfloat16", "--compile", "1", "--hellaswag", "1", "--log_dir",
                       "whole", cwd=tmp_path, env=env, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "dtype: bfloat16 (asked for)" in whole.stdout and "compile: True" in whole.stdout
    kernels = list((tmp_path / "inductor-cache").rglob("*.so"))  # inductor generated C++ kernels and compiled them
    assert kernels and (tmp_path / "inductor-cache" / "fxgraph").is_dir(), os.listdir(tmp_path / "inductor-cache")
    # resumed from step 16 with no other flag (the checkpoint's: bfloat16 and compile too), bit for bit
    resumed = run_script("train_gpt2.py", "--resume", "whole/model_00016.pt", "--log_dir", "resumed", cwd=tmp_path,
                         env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log, again = read_log(tmp_path / "whole" / "log.txt"), read_log(tmp_path / "resumed" / "log.txt")
    assert {k[0] for k in log if k[1] == "hella"} == {0, 8, 16, 24}  # the compiled scorer ran
    assert again == {k: v for k, v in log.items() if k[0] >= 16} and len(again) == 8 + 2 * 2
    a, b = (torch.load(tmp_path / d / "model_00024.pt", weights_only=True) for d in ("whole", "resumed"))
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for i, s in a["optimizer"]["state"].items()
               for k, v in s.items())
    # within bfloat16's precision (8 bits of mantissa) of the float32 run's losses, and not the same numbers
    fp32 = read_log(shared_run[0] / "log.txt")
    pairs = [(float(log[k]), float(fp32[k])) for k in fp32 if k[1] in ("train", "val")]
    assert len(pairs) == 28 and all(abs(x - y) <= 2**-8 * abs(y) for x, y in pairs)
    assert any(x != y for x, y in pairs)
