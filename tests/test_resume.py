"""Never lose a run: exact resume after SIGKILL, preemption by SIGTERM or Ctrl-C on one process and under torchrun,
a second Ctrl-C that stops at once, torchrun restarts, and resuming on another number of processes."""
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, RUN, exit_probe_env, finish, gloo_threads_at_exit, kill_group, read_log, run_main, \
    run_script, start, torchrun, torchrun_cmd, train_losses, wait_for_line


def assert_same_run(a, b):
    """Two log directories hold the same run, bit for bit: every train and val line, and the final weights and
    optimizer state."""
    assert read_log(Path(a) / "log.txt") == read_log(Path(b) / "log.txt")
    ca, cb = (torch.load(Path(d) / "model_00024.pt", weights_only=True) for d in (a, b))
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    for i, state in ca["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, cb["optimizer"]["state"][i][k]), (i, k)


def pid_of_rank(launcher, rank):
    """The pid of torchrun's worker with RANK=rank."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(pid)
    pytest.fail(f"no worker with RANK={rank}")


def test_resume_after_sigkill_is_bit_exact_and_skips_a_half_written_checkpoint(tmp_path, shared_run):
    proc = start([sys.executable, str(REPO / "train_gpt2.py"), *RUN, "--log_dir", "log"], cwd=tmp_path)
    wait_for_line(proc, "saved log/model_00008.pt")
    kill_group(proc, signal.SIGSTOP)  # frozen at once: then killed where it stood
    before = (tmp_path / "log" / "log.txt").read_text()
    kill_group(proc)
    proc.wait()
    assert "7 train" in before and "16 val" not in before  # the moment aimed at: after a checkpoint, before the next
    (tmp_path / "log" / "model_00016.pt.4242.tmp").write_bytes(b"half a checkpoint")  # a kill mid-write leaves it
    r = run_script("train_gpt2.py", "--resume", "auto", "--log_dir", "log", cwd=tmp_path)  # (the checkpoint's flags)
    assert r.returncode == 0, r.stderr
    assert "resumed from log/model_00008.pt at step 8" in r.stdout
    assert not list((tmp_path / "log").glob("*.tmp"))  # removed
    assert (tmp_path / "log" / "log.txt").read_text().startswith(before)  # appended to, never truncated
    assert_same_run(tmp_path / "log", shared_run[0])


@pytest.mark.parametrize("how", ["SIGTERM twice", "SIGINT"])
def test_a_signal_ends_the_step_saves_and_resumes_exactly(tmp_path, shared_run, how, capsys):
    proc = start([sys.executable, str(REPO / "train_gpt2.py"), *RUN, "--log_dir", "log"], cwd=tmp_path)
    wait_for_line(proc, "step     9 | loss")
    if how == "SIGTERM twice":  # a scheduler's SIGTERM and torchrun's copy of it: one request
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGINT)
    out = finish(proc)
    assert proc.returncode == 128 + (signal.SIGTERM if how == "SIGTERM twice" else signal.SIGINT)
    line = [ln for ln in out.splitlines() if ln.startswith("stopped by")]
    assert len(line) == 1 and "Traceback" not in out
    step = int(line[0].split("after step ")[1].split(":")[0])
    assert 9 <= step < 23 and f"saved log/model_{step + 1:05d}.pt; go on with python train_gpt2.py --resume auto " \
                               f"--log_dir log" in line[0]
    r = run_main(capsys, tmp_path, *RUN, "--log_dir", "log", "--resume", "auto")
    assert r.returncode == 0, r.stderr
    assert_same_run(tmp_path / "log", shared_run[0])


# a model whose CPU step takes seconds (2 here), most of it in single long calls (backward is one)
SLOW = [*RUN, "--n_layer", "2", "--n_head", "4", "--n_embd", "256", "--block_size", "256", "--T", "256",
        "--total_batch_size", "1024", "--val_steps", "1", "--eval_interval", "100", "--checkpoint_interval", "1",
        "--log_dir", "log"]


def ctrl_c_twice(proc, signalled):
    """Once step 1 has begun (after step 0 and its checkpoint), Ctrl-C `signalled` (a pid), wait for the line that
    says the step will finish, Ctrl-C again; all the output."""
    lines = wait_for_line(proc, "saved log/model_00001.pt")
    os.kill(signalled, signal.SIGINT)
    lines += wait_for_line(proc, "Ctrl-C again stops at once")
    os.kill(signalled, signal.SIGINT)
    return "".join(lines) + finish(proc)


def assert_stopped_in_step_1(out, log_dir):
    """Step 1 was neither finished nor saved, and the last line names the checkpoint of step 1 (one process: the
    signal's, SIGINT; under torchrun, SIGTERM)."""
    assert "step     1 | loss" not in out and sorted(p.name for p in log_dir.glob("model_*")) == ["model_00001.pt"]
    assert [ln for ln in out.splitlines() if ln.startswith("stopped at once")] == [
        f"stopped at once by {'SIGTERM' if 'torch.distributed' in out else 'SIGINT'}: the step in progress is lost; "
        f"the last checkpoint is log/model_00001.pt"], out[-3000:]


def test_ctrl_c_again_stops_at_once_naming_the_last_checkpoint(tmp_path):
    proc = start([sys.executable, str(REPO / "train_gpt2.py"), *SLOW], cwd=tmp_path)
    out = ctrl_c_twice(proc, proc.pid)
    assert "SIGINT: the step in progress will finish and be saved, then the run stops; Ctrl-C again stops at " \
           "once" in out
    assert proc.returncode == 130
    assert_stopped_in_step_1(out, tmp_path / "log")


def test_under_torchrun_ctrl_c_again_ends_every_rank_at_once(tmp_path):
    """A terminal's Ctrl-C reaches torchrun (its workers have sessions of their own): it passes the first on as
    SIGINT, the second as SIGTERM. Every rank ends at once, and torchrun with them."""
    launcher = start(torchrun_cmd(2, *SLOW, "--total_batch_size", "2048"), cwd=tmp_path)
    wait_for_line(launcher, "step     0 | val loss")
    ranks = [pid_of_rank(launcher, rank) for rank in (0, 1)]
    out = ctrl_c_twice(launcher, launcher.pid)
    assert_stopped_in_step_1(out, tmp_path / "log")
    for pid in ranks:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_under_torchrun_every_rank_stops_at_the_same_step_and_the_run_resumes_exactly(tmp_path, ddp_run):
    launcher = start(torchrun_cmd(2, *RUN, "--log_dir", "log"), cwd=tmp_path, env=exit_probe_env(tmp_path))
    wait_for_line(launcher, "step     9 | loss")
    os.kill(pid_of_rank(launcher, 1), signal.SIGTERM)  # one rank only is told: the ranks agree on the step
    out = finish(launcher)
    assert launcher.returncode != 0 and "SIGABRT" not in out
    assert gloo_threads_at_exit(tmp_path) == {0: [], 1: []}  # (each rank ended its process group: see test_ddp)
    line = [ln for ln in out.splitlines() if ln.startswith("stopped by SIGTERM after step")]
    assert len(line) == 1, out[-3000:]
    step = int(line[0].split("after step ")[1].split(":")[0])
    log = read_log(tmp_path / "log" / "log.txt")
    assert max(k[0] for k in log if k[1] == "train") == step  # no rank went on: rank 0 logged the last step
    assert sorted(p.name for p in (tmp_path / "log").glob("model_*.pt"))[-1] == f"model_{step + 1:05d}.pt"
    r = torchrun(2, *RUN, "--log_dir", "log", "--resume", "auto", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(tmp_path / "log", ddp_run[0])


def test_torchrun_restarts_after_a_killed_rank_and_finishes_like_an_undisturbed_run(tmp_path, ddp_run):
    launcher = start(torchrun_cmd(2, *RUN, "--resume", "auto", "--log_dir", "log", extra=["--max-restarts=1"]),
                     cwd=tmp_path)
    wait_for_line(launcher, "saved log/model_00008.pt")
    os.kill(pid_of_rank(launcher, 1), signal.SIGKILL)
    out = finish(launcher)
    assert launcher.returncode == 0, out[-3000:]
    assert "resumed from log/model_00008.pt at step 8" in out
    assert train_losses(tmp_path / "log") == train_losses(ddp_run[0])


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_processes(tmp_path, shared_run, ddp_run, before, after, capsys):
    source = {1: shared_run, 2: ddp_run}[before][0]
    (tmp_path / "log").mkdir()
    shutil.copy(source / "model_00008.pt", tmp_path / "log")
    flags = [*RUN, "--log_dir", "log", "--resume", "auto"]
    r = run_main(capsys, tmp_path, *flags) if after == 1 else torchrun(2, *flags, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at step 8 (written by {before} processes)" in r.stdout
    assert f"gradient accumulation steps: {2 // after}" in r.stdout  # the same total batch
    resumed, whole = train_losses(tmp_path / "log"), train_losses(source)
    assert sorted(resumed) == list(range(8, 24))
    for step, loss in resumed.items():  # the same tokens in every step; only the order of the sums differs
        assert loss == pytest.approx(whole[step], abs=1e-3), step
