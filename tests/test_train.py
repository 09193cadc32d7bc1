"""train_gpt2.py as a user runs it: the run and what it prints and writes, the checks before step 0, one run per
log directory, failed checkpoint writes, float16, and the CUDA start-up path followed on the CPU."""
import json
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt2
from conftest import REPO, RUN, TINY, digests, env_for_tests, kill_group, read_log, run_main, run_script, start, \
    tiny_flops_per_token, train_losses, wait_for_line


def test_import_starts_nothing(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import train_gpt2"], cwd=tmp_path, capture_output=True, text=True,
                       env=env_for_tests(PYTHONPATH=REPO))
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    assert list(tmp_path.iterdir()) == []


def test_the_run_learns_and_logs_as_the_lecture_and_prints_what_a_person_reads(shared_run):
    log_dir, r = shared_run
    out = r.stdout
    assert "preset: shakespeare" in out and "input.txt" in out and "n_layer=2" in out  # the flags win
    assert out.count("schedule: warmup 2 steps to max_lr 0.01, cosine to min_lr 0.001 at 24") == 1
    log = read_log(log_dir / "log.txt")
    train = [float(log[(s, "train")]) for s in range(24)]
    assert train[0] == pytest.approx(np.log(50304), abs=0.3)  # a fresh model is about uniform over the vocabulary
    assert train[-1] < train[0] - 0.5  # and learns
    assert {k for k in log if k[1] == "val"} == {(0, "val"), (8, "val"), (16, "val"), (24, "val")}
    step_lines = [line for line in out.splitlines() if "| loss:" in line]
    assert len(step_lines) == 24 and all(" | lr " in line and "tok/sec" in line for line in step_lines)
    assert all(" | eta " in line for line in step_lines[4:]) and not any(" | eta " in ln for ln in step_lines[:4])
    assert [line.split("|")[0].split() for line in out.splitlines() if "| val loss" in line] == \
        [["step", "0"], ["step", "8"], ["step", "16"], ["step", "24"]]
    samples = [line for line in out.splitlines() if line.startswith("sample ")]  # (no "rank 0": one process)
    assert len(samples) == 12 and all(s.split(": ", 1)[1].startswith("Hello, I'm a language model,") for s in samples)
    assert sorted(p.name for p in log_dir.glob("model_*.pt")) == ["model_00008.pt", "model_00016.pt", "model_00024.pt"]
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("done in 0:00:") and f"final val loss {float(log[(24, 'val')]):.4f}" in summary
    best = min((float(v), k[0]) for k, v in log.items() if k[1] == "val")
    assert f"best {best[0]:.4f} at step {best[1]}" in summary
    assert f"sample with python train_gpt2.py --init_from {log_dir / 'model_00024.pt'} --sample" in summary


def test_warmup_scales_with_max_steps_unless_given():
    def warmup(*flags):
        args = train_gpt2.parse_config([*flags, "--device", "cpu", "--data", str(REPO / "input.txt")], 1)[0]
        return args.warmup_steps
    assert warmup() == 100  # the CPU preset's
    assert warmup("--max_steps", "19073") == 715 and warmup("--max_steps", "2000") == 75  # the lecture's share
    assert warmup("--max_steps", "10") == 1  # at least one step
    assert warmup("--max_steps", "2000", "--warmup_steps", "7") == 7


@pytest.mark.parametrize("preset, model, B, tokens, schedule, fsdp", [
    ("gpt2-medium", (24, 16, 1024), 32, 524288, (3e-4, 0.0, 700, 60000), 0),  # llm.c's run_gpt2_350M.sh
    ("gpt2-large", (36, 20, 1280), 16, 524288, (2.5e-4, 0.0, 700, 286102), 0),  # run_gpt2_774M.sh
    ("gpt2-xl", (48, 25, 1600), 16, 1048576, (6e-4, 6e-5, 700, 32000), 1)])  # run_gpt2_1558M.sh (B: the memory plan)
def test_the_bigger_gpt2s_presets_are_llmcs_recipes_and_scale_to_max_steps(preset, model, B, tokens, schedule, fsdp):
    def parse(*flags):
        return train_gpt2.parse_config(["--preset", preset, "--device", "cpu", "--data", str(REPO / "input.txt"),
                                        *flags], 8)[0]
    args = parse()
    assert (args.n_layer, args.n_head, args.n_embd, args.block_size, args.T) == (*model, 1024, 1024)
    assert (args.B, args.total_batch_size, args.fsdp) == (B, tokens, fsdp)
    assert (args.max_lr, args.min_lr, args.warmup_steps, args.max_steps) == schedule
    assert parse("--max_steps", "1000").warmup_steps == round(1000 * 700 / schedule[3])  # the warmup keeps its share


def bad_input(tmp_path, case):
    """The flags of a bad-input case, with the files it needs made in tmp_path."""
    d = tmp_path / "data"
    d.mkdir()
    np.save(d / "edufineweb_val_000000.npy", np.arange(5000, dtype=np.uint16))
    np.save(d / "edufineweb_train_000001.npy", np.full(5000, 60000, dtype=np.uint16))
    (tmp_path / "not-utf8.txt").write_bytes(b"caf\xe9 " * 2000)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("some text")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    (tmp_path / "a-file").write_text("precious")
    return {
        "--data without shards": (["--data", tmp_path / "texts"],
                                  "holds no .npy (nor nanoGPT's or llm.c's .bin) shards: make them with fineweb.py"),
        "--data missing": (["--data", tmp_path / "nope"], "give a directory of shards (not one shard), a .txt or a "),
        "--data one shard": (["--data", d / "edufineweb_val_000000.npy"], "give a directory of shards (not one shard)"),
        "token ids beyond the vocabulary": (["--data", d], "below vocab_size 50304"),
        "text not UTF-8": (["--data", tmp_path / "not-utf8.txt"], "is not UTF-8"),
        "--log_dir is a file": (["--log_dir", tmp_path / "a-file"], "cannot write to --log_dir"),
        "--max_lr 0": (["--max_lr", "0"], "--max_lr 0.0 is out of range: give > 0"),
        "--min_lr above --max_lr": (["--min_lr", "1"], "--min_lr 1.0 is out of range: give >= 0 and <= --max_lr"),
        "negative --weight_decay": (["--weight_decay", "-0.1"], "--weight_decay -0.1 is out of range"),
        "negative --max_steps": (["--max_steps", "-3"], "--max_steps -3 is out of range"),
        "--B 0": (["--B", "0"], "--B 0 is out of range"),
        "batch does not divide": (["--total_batch_size", "100"], "give a multiple of B*T*world_size = 64"),
        "heads do not divide": (["--n_head", "3"], "n_head=3, n_embd=16) cannot be built: sizes > 0, n_embd a "
                                                   "multiple of n_head"),
        "T above block size": (["--T", "32"], "is longer than the model's block size 16"),
        "--resume garbage": (["--resume", tmp_path / "garbage.pt"], "cannot load checkpoint"),
        "--resume a foreign file": (["--resume", tmp_path / "foreign.pt"], "is not a checkpoint of train_gpt2.py"),
        "--resume missing": (["--resume", tmp_path / "no.pt"], "no.pt: no such file"),
        "--device cuda": (["--device", "cuda"], "--device cuda: not here"),
    }[case]


@pytest.mark.parametrize("case", ["--data without shards", "--data missing", "--data one shard",
                                  "token ids beyond the vocabulary", "text not UTF-8", "--log_dir is a file",
                                  "--max_lr 0", "--min_lr above --max_lr", "negative --weight_decay",
                                  "negative --max_steps", "--B 0", "batch does not divide", "heads do not divide",
                                  "T above block size", "--resume garbage", "--resume a foreign file",
                                  "--resume missing", "--device cuda"])
def test_bad_input_is_one_line_before_step_0(tmp_path, capsys, case):
    flags, message = bad_input(tmp_path, case)
    if case == "--device cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = [*TINY, "--max_steps", "2", "--log_dir", tmp_path / "log", *flags]
    if case == "--device cuda":
        argv.remove("cpu")
        argv.remove("--device")
    with pytest.raises(SystemExit) as exit_:
        train_gpt2.main([str(a) for a in argv])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_gpt2.py: error: ") and message in err[0], err
    assert not (tmp_path / "log" / "log.txt").exists()  # stopped before step 0
    assert (tmp_path / "a-file").read_text() == "precious"


def test_a_log_dir_that_cannot_be_written_is_one_line_before_step_0(tmp_path, capsys, read_only_dir):
    log_dir = read_only_dir / "log"
    with pytest.raises(SystemExit) as exit_:
        train_gpt2.main([*TINY, "--max_steps", "2", "--log_dir", str(log_dir)])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1
    assert err.startswith(f"train_gpt2.py: error: cannot write to --log_dir {log_dir} (") and "give another" in err


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    r = run_script("train_gpt2.py", *TINY, "--min_lr", "1", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "out of range" in r.stderr


def test_a_flag_that_argparse_rejects_is_one_line_without_the_usage(capsys):
    for argv, message in [(["--B", "x"], "argument --B: invalid int value: 'x'"),
                          (["--no_such_flag"], "unrecognized arguments: --no_such_flag")]:
        with pytest.raises(SystemExit) as exit_:
            train_gpt2.main(argv)
        assert exit_.value.code == f"train_gpt2.py: error: {message}"  # (what Python prints, exit status 1)
    assert capsys.readouterr() == ("", "")


def test_resume_with_flags_that_contradict_the_checkpoint_is_refused(tmp_path, shared_run, capsys):
    log_dir, _ = shared_run
    with pytest.raises(SystemExit):
        train_gpt2.main([*map(str, RUN), "--n_layer", "3", "--resume", str(log_dir / "model_00008.pt"),
                         "--log_dir", str(tmp_path / "log")])
    err = capsys.readouterr().err
    assert "the model has n_layer=2: drop those flags" in err and err.count("\n") == 1


def test_one_run_per_log_dir(tmp_path, capsys):
    first = start([sys.executable, str(REPO / "train_gpt2.py"), *TINY, "--max_steps", "100000", "--log_dir", "log"],
                  cwd=tmp_path)
    try:
        wait_for_line(first, "step     1 | loss")
        first.send_signal(signal.SIGSTOP)  # (holding its lock, and no CPU)
        t0 = time.time()
        second = run_script("train_gpt2.py", *TINY, "--max_steps", "5", "--log_dir", "log", cwd=tmp_path)
        t1 = time.time()
        (tmp_path / "a-file").write_text("")  # a --log_dir that fails where the lock is taken, at once
        baseline = run_script("train_gpt2.py", *TINY, "--max_steps", "5", "--log_dir", "a-file", cwd=tmp_path)
        # refused at once: in about the time of a run stopped at the same point by a bad --log_dir, never after a wait
        assert second.returncode == 1 and baseline.returncode == 1 and t1 - t0 < 3 * (time.time() - t1)
        first.send_signal(signal.SIGCONT)
        assert second.stderr.strip() == (f"train_gpt2.py: error: --log_dir log is in use by another run (pid "
                                         f"{first.pid}); give another")
        lines = wait_for_line(first, "| loss")  # the first goes on undisturbed
        assert first.poll() is None and not any("error" in line for line in lines)
        assert not list((tmp_path / "log").glob("previous-*"))  # and its files were not moved
    finally:
        kill_group(first)
    first.wait()
    before = digests(tmp_path / "log")
    # the kernel dropped the killed run's lock: a new run takes the directory, and moves the old run aside, whole
    r = run_main(capsys, tmp_path, *TINY, "--max_steps", "1", "--log_dir", "log")
    assert r.returncode == 0, r.stderr
    moved = list((tmp_path / "log").glob("previous-*"))
    assert len(moved) == 1 and f"log held an earlier run: moved to {Path('log') / moved[0].name}" in r.stdout
    assert digests(moved[0]) == {k: v for k, v in before.items() if k != "lock"} and "log.txt" in before


def test_no_run_clobbers_another(tmp_path, shared_run, capsys):
    theirs = tmp_path / "theirs"
    shutil.copytree(shared_run[0], theirs)
    before = digests(theirs)
    # resuming another directory's checkpoint starts this directory's own history; the other run stays as it was
    r = run_main(capsys, tmp_path, *RUN, "--resume", theirs / "model_00016.pt", "--log_dir", tmp_path / "mine")
    assert r.returncode == 0, r.stderr
    assert digests(theirs) == before
    mine = read_log(tmp_path / "mine" / "log.txt")
    assert min(k[0] for k in mine) == 16 and mine[(23, "train")] == read_log(theirs / "log.txt")[(23, "train")]


def test_resume_auto_with_no_checkpoint_says_it_starts_afresh(tmp_path, capsys):
    args = train_gpt2.parse_config([*TINY, "--resume", "auto", "--log_dir", str(tmp_path)], 1)[0]
    assert args.resume is None
    assert capsys.readouterr().out == f"--resume auto: no checkpoint in {tmp_path}, starting afresh\n"


def test_a_failed_checkpoint_write_stops_in_one_line_and_keeps_the_earlier_ones(tmp_path, shared_run):
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    shutil.copy(shared_run[0] / "model_00008.pt", log_dir)
    before = digests(log_dir)
    limit = 1 << 20  # a file size limit (ulimit -f) below a checkpoint's size: the write fails with EFBIG

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run([sys.executable, str(REPO / "train_gpt2.py"), *RUN, "--resume", "auto", "--log_dir",
                        str(log_dir)], cwd=tmp_path, env=env_for_tests(), capture_output=True, text=True,
                       preexec_fn=small_files, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"train_gpt2.py: error: could not write {log_dir}/model_00016.pt (File "
                                             f"too large); the earlier checkpoints are intact"]
    assert {k: v for k, v in digests(log_dir).items() if k.startswith("model_")} == before
    assert not list(log_dir.glob("*.tmp"))
    assert train_gpt2.load_checkpoint(log_dir / "model_00008.pt", resume=True)["step"] == 8


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    r = run_main(capsys, tmp_path, *TINY, "--warmup_steps", "0", "--max_lr", "1e4", "--min_lr", "1e4",
                 "--max_steps", "20", "--checkpoint_interval", "1", "--eval_interval", "1", "--log_dir", "log")
    assert r.returncode == 1
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("train_gpt2.py: error: step 1: the loss or gradient norm is not finite, the run diverged")
    assert line.endswith("--resume log/model_00001.pt")
    ckpt = torch.load(tmp_path / "log" / "model_00001.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (tmp_path / "log" / "model_00002.pt").exists()


def test_float16_trains_and_resumes_exactly(tmp_path, capsys):
    flags = [*RUN, "--dtype", "float16", "--max_steps", "6", "--checkpoint_interval", "3", "--eval_interval", "6"]
    whole = run_main(capsys, tmp_path, *flags, "--log_dir", "whole")
    assert whole.returncode == 0, whole.stderr
    assert "dtype: float16 (asked for)" in whole.stdout
    losses = train_losses(tmp_path / "whole")
    assert all(np.isfinite(list(losses.values()))) and losses[5] < losses[0] - 0.3
    ckpt = torch.load(tmp_path / "whole" / "model_00003.pt", weights_only=True)
    assert ckpt["scaler"]["scale"] > 0  # the gradient scaler's state is in the checkpoint
    proc = start([sys.executable, str(REPO / "train_gpt2.py"), *flags, "--log_dir", "cut"], cwd=tmp_path)
    wait_for_line(proc, "saved cut/model_00003.pt")
    kill_group(proc, signal.SIGSTOP)
    assert "5 train" not in (tmp_path / "cut" / "log.txt").read_text()  # stopped before the last checkpoint
    kill_group(proc)
    proc.wait()
    r = run_main(capsys, tmp_path, *flags, "--resume", "auto", "--log_dir", "cut")
    assert r.returncode == 0, r.stderr
    assert train_losses(tmp_path / "cut") == losses


def test_a_float16_step_with_an_inf_gradient_is_skipped_and_the_run_goes_on_and_resumes_exactly(tmp_path, capsys):
    flags = [*RUN, "--dtype", "float16", "--max_steps", "8", "--checkpoint_interval", "2", "--eval_interval", "8"]
    r = run_main(capsys, tmp_path, *flags, "--log_dir", "a")
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / "a" / "model_00002.pt", weights_only=True)
    ckpt["scaler"]["scale"] = 2.0**20  # a loss scale so high that the scaled float16 gradients overflow
    torch.save(ckpt, tmp_path / "high-scale.pt")
    r = run_main(capsys, tmp_path, *flags, "--resume", "high-scale.pt", "--checkpoint_interval", "1", "--log_dir", "b")
    assert r.returncode == 0 and "done in" in r.stdout, r.stderr  # the run goes on to its end
    skipped = [int(ln.split("|")[0].split()[1]) for ln in r.stdout.splitlines() if "skipped: inf/NaN gradient" in ln]
    assert skipped and skipped[0] == 2 and "norm: inf" in r.stdout
    for step in skipped:  # the weights and the optimizer's state after a skipped step: those before it
        before, after = (ckpt if step == 2 else torch.load(tmp_path / "b" / f"model_{step:05d}.pt", weights_only=True),
                         torch.load(tmp_path / "b" / f"model_{step + 1:05d}.pt", weights_only=True))
        assert all(torch.equal(v, after["model"][k]) for k, v in before["model"].items()), step
        assert all(torch.equal(v, after["optimizer"]["state"][i][k])
                   for i, state in before["optimizer"]["state"].items() for k, v in state.items()), step
        assert after["scaler"]["scale"] == before["scaler"]["scale"] / 2  # and the scale drops
    resume_from = skipped[-1] + 1  # after the last skip: resuming gives the same run, bit for bit
    r = run_main(capsys, tmp_path, "--resume", tmp_path / "b" / f"model_{resume_from:05d}.pt", "--log_dir", "c")
    assert r.returncode == 0, r.stderr
    b, c = read_log(tmp_path / "b" / "log.txt"), read_log(tmp_path / "c" / "log.txt")
    assert c == {k: v for k, v in b.items() if k[0] >= resume_from} and len(c) >= 3
    final_b, final_c = (torch.load(tmp_path / d / "model_00008.pt", weights_only=True) for d in "bc")
    assert all(torch.equal(v, final_c["model"][k]) for k, v in final_b["model"].items())


def test_the_mfu_printed_is_flops_per_token_times_tokens_per_second_over_the_peak(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_gpt2, "PEAK_FLOPS", {"cpu": 1e10})  # the one place: a peak for this device's name
    r = run_main(capsys, tmp_path, *TINY, "--dtype", "bfloat16", "--max_steps", "5", "--log_dir", "log")
    assert r.returncode == 0, r.stderr
    n_params = int(r.stdout.split("model: ")[1].split(" parameters")[0].replace(",", ""))
    flops_per_token = tiny_flops_per_token(n_params)
    steps = [ln for ln in r.stdout.splitlines() if "| loss:" in ln]
    assert len(steps) == 5
    for line in steps:
        tok_per_sec = float(line.split("tok/sec: ")[1].split()[0])
        mfu = float(line.split("mfu: ")[1].split("%")[0])
        assert mfu == pytest.approx(100 * flops_per_token * tok_per_sec / 1 / 1e10, abs=0.006)


def test_device_cuda_n_under_torchrun_is_one_line_naming_local_rank(capsys, monkeypatch):
    for var, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):  # (as torchrun sets them)
        monkeypatch.setenv(var, value)
    with pytest.raises(SystemExit) as exit_:
        train_gpt2.main([*TINY[:TINY.index("--device")], "--device", "cuda:1", "--max_steps", "1"])
    assert exit_.value.code == 1
    assert capsys.readouterr().err == ("train_gpt2.py: error: --device cuda:1 under torchrun: each rank takes "
                                       "cuda:LOCAL_RANK; give --device cuda\n")


def follow_cuda_start_up(tmp_path, env=(), bf16=True, flags=()):
    """Run train_gpt2.main with torch.cuda saying a GPU is there, up to the seeding of the GPUs (which ends the run);
    returns what it printed and the CUDA calls it made: set_device, is_bf16_supported (and the GPU it asked, the
    current one), init_process_group (and its timeout in seconds)."""
    script = f"""
import json, os, sys, torch, torch.distributed as dist
sys.path.insert(0, {str(REPO)!r})
calls = []
current = ["cuda:0"]
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 2
torch.cuda.get_device_name = lambda device=None: "Tesla T4" if not {bf16} else "NVIDIA A100-SXM4-80GB"
def is_bf16_supported(including_emulation=True):
    calls.append(["is_bf16_supported", current[0]])
    return {bf16} or including_emulation
torch.cuda.is_bf16_supported = is_bf16_supported
def init_process_group(backend, **kw):
    calls.append(["init_process_group", backend, kw["timeout"].total_seconds() if "timeout" in kw else None])
dist.init_process_group = init_process_group
def set_device(device):
    calls.append(["set_device", str(device)])
    current[0] = str(device)
torch.cuda.set_device = set_device
def manual_seed_all(seed):
    print("CALLS " + json.dumps(calls), flush=True)
    os._exit(0)
torch.cuda.manual_seed_all = manual_seed_all
import train_gpt2
train_gpt2.main({[a for a in TINY if a not in ("--device", "cpu")] + ["--log_dir", "log", *map(str, flags)]!r})
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=env_for_tests(**dict(env)))
    assert r.returncode == 0, r.stderr
    return r.stdout, json.loads(r.stdout.split("CALLS ")[1])


def test_one_gpu_start_up_sets_an_indexed_device(tmp_path):
    out, calls = follow_cuda_start_up(tmp_path)
    assert calls == [["set_device", "cuda:0"], ["is_bf16_supported", "cuda:0"]]
    assert "device: cuda x 1; dtype: bfloat16 (the GPU has bfloat16 tensor cores); compile: True;" in out


def test_eval_only_on_a_gpu_neither_compiles_nor_speaks_of_gradient_accumulation(tmp_path, shared_run):
    """One pass over the val batches does not repay minutes of compile; and nothing accumulates gradients."""
    out, _ = follow_cuda_start_up(tmp_path, flags=["--eval_only", "--init_from", shared_run[0] / "model_00024.pt"])
    assert "device: cuda x 1; dtype: bfloat16 (the GPU has bfloat16 tensor cores); compile: False;" in out
    assert "gradient accumulation" not in out and "total desired batch size" not in out


def test_torchrun_start_up_sets_the_local_ranks_device_before_asking_it_anything(tmp_path):
    """Rank 1 asks GPU 1 whether it has bfloat16, not GPU 0; and NCCL waits an hour, not its default 10 minutes, for a
    rank: the others wait while rank 0 writes a checkpoint (GPT-2 XL's: 19 GB) or downloads HellaSwag."""
    env = {"RANK": 1, "LOCAL_RANK": 1, "WORLD_SIZE": 2, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 29999}
    out, calls = follow_cuda_start_up(tmp_path, env)
    assert calls == [["set_device", "cuda:1"], ["is_bf16_supported", "cuda:1"], ["init_process_group", "nccl", 3600]]


def test_the_recipe_is_chosen_on_a_gpu_with_fineweb_sized_shards_only(tmp_path):
    """A GPU and 1e8 tokens of train shards: the recipe (gpt2). A GPU and a small text made into shards (the
    README's own-text walk): the small preset, which fits it."""
    for name, tokens in [("big", 10**8), ("small", 30_000)]:
        d = tmp_path / name
        d.mkdir()
        np.save(d / "edufineweb_val_000000.npy", np.zeros(30_000, dtype=np.uint16))
        with open(d / "edufineweb_train_000001.npy", "wb") as f:  # (sparse: no disk is used for the zeros)
            np.lib.format.write_array_header_1_0(f, {"descr": "<u2", "fortran_order": False, "shape": (tokens,)})
            f.truncate(f.tell() + 2 * tokens)
    out, _ = follow_cuda_start_up(tmp_path, flags=["--data", tmp_path / "big"])
    assert "preset: gpt2 (cuda, over 1e8 tokens of train shards)" in out
    out, _ = follow_cuda_start_up(tmp_path, flags=["--data", tmp_path / "small"])
    assert "preset: shakespeare (cuda, under 1e8 tokens of train shards)" in out


def test_dtype_auto_is_float16_on_a_gpu_without_native_bfloat16(tmp_path):
    out, _ = follow_cuda_start_up(tmp_path, bf16=False)
    assert "dtype: float16 (the GPU has no native bfloat16: float16, with a gradient scaler)" in out


def test_benchmark_prints_one_json_line_describing_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:  # (in this process: the training loop's own handlers are put back after)
        train_gpt2.main([*TINY, "--benchmark", "4", "--log_dir", "log"])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["steps"] == 4 and info["tok_per_sec"] > 0 and info["ms_per_step"] > 0
    assert info["mfu"] is None and info["peak_memory_gib"] is None  # a CPU: no peak to divide by, never a guess
    assert {k: info[k] for k in ("n_layer", "n_embd", "block_size", "vocab_size", "B", "T", "grad_accum_steps",
                                 "total_batch_size", "world_size", "dtype", "compile", "preset")} == \
        {"n_layer": 2, "n_embd": 16, "block_size": 16, "vocab_size": 50304, "B": 4, "T": 16, "grad_accum_steps": 2,
         "total_batch_size": 128, "world_size": 1, "dtype": "float32", "compile": False, "preset": "shakespeare"}
    assert info["n_params"] == 811_712 and info["torch"] == torch.__version__ and info["device"]
    assert not (tmp_path / "log").exists()  # no files


# MFU's peaks, from the vendors' documents (TFLOP/s, dense bf16/fp16 tensor math; where a sheet gives only the figure
# with 2:4 sparsity, half of it), each with where it was read
PEAKS = {
    "NVIDIA H100 80GB HBM3": (989, "H100 data sheet, SXM: BF16 tensor 1,979 with sparsity"),
    "NVIDIA H100 PCIe": (756, "H100 data sheet, PCIe: 1,513 with sparsity"),
    "NVIDIA H100 NVL": (835, "H100 data sheet, NVL: 1,671 with sparsity"),
    "NVIDIA H200": (989, "H200 data sheet, SXM: 1,979 with sparsity"),
    "NVIDIA GH200 480GB": (989, "GH200 data sheet: 1,979 with sparsity"),
    "NVIDIA B200": (2250, "HGX B200 data sheet: FP16/BF16 tensor 4.5 PFLOPS a GPU with sparsity"),
    "NVIDIA A100-SXM4-80GB": (312, "A100 data sheet: BF16 tensor 312, 624 with sparsity"),
    "NVIDIA A100-PCIE-40GB": (312, "A100 data sheet"),
    "NVIDIA A10": (125, "A10 data sheet: BF16 tensor 125, 250 with sparsity"),
    "NVIDIA RTX A6000": (155, "RTX A6000 data sheet: 309.7 with sparsity"),
    "NVIDIA L4": (121, "L4 data sheet: 242 with sparsity"),
    "NVIDIA L40S": (362, "L40S data sheet: 733 with sparsity"),
    "NVIDIA RTX 6000 Ada Generation": (364, "RTX 6000 Ada data sheet: 728.5 with sparsity"),
    "NVIDIA GeForce RTX 3090": (71, "NVIDIA Ampere GA102 whitepaper: FP16 tensor, FP32 accumulate, 71 dense"),
    "NVIDIA GeForce RTX 4090": (165, "NVIDIA Ada Lovelace whitepaper: FP16 tensor, FP32 accumulate, 165.2 dense"),
    "Tesla T4": (65, "T4 data sheet: mixed precision FP16/FP32 65"),
    "Tesla V100-SXM2-16GB": (125, "V100 data sheet, SXM2: tensor performance 125"),
    "AMD Instinct MI300X": (1307, "MI300X data sheet: BF16 1,307.4 dense"),
    "AMD Instinct MI250X": (191.5, "MI250X data sheet: BF16 383 for its 2 dies; torch sees each die as a device"),
}  # (the names: torch.cuda.get_device_name(); on ROCm, libdrm's amdgpu.ids: 0x7408 "AMD Instinct MI250X")


def test_mfu_peaks_are_the_vendors_dense_16_bit_figures_by_exact_device_name():
    assert {name: train_gpt2.PEAK_FLOPS[name] / 1e12 for name in PEAKS} == \
        pytest.approx({name: figure for name, (figure, _) in PEAKS.items()}, abs=0.5)
    # no guess: a name torch does not give, a GPU without a data sheet (AWS's A10G), or ROCm's name for device 0x740C,
    # which is an MI250X (191.5 a die) or an MI250 (181), gets no MFU
    for name in ("H100", "NVIDIA H100", "NVIDIA A10G", "AMD Instinct MI250X / MI250", "AMD Instinct MI250X/MI250"):
        assert name not in train_gpt2.PEAK_FLOPS
