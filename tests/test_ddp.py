"""DDP: a real 2-process gloo run through torchrun equals a 1-process run with the same total batch."""
import subprocess
import sys

import pytest

from conftest import REPO, TINY, env_for_tests, read_log, run_script

STEPS = ["--max_steps", "6", "--eval_interval", "3", "--total_batch_size", "128"]  # B*T = 64: 2 micro steps in all


def torchrun(nproc, *args, cwd, extra=(), timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra,
           str(REPO / "train_gpt2.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env_for_tests(), capture_output=True, text=True, timeout=timeout)


def test_two_gloo_ranks_match_one_process_with_accumulation(tmp_path):
    one = run_script("train_gpt2.py", *TINY, *STEPS, "--log_dir", tmp_path / "one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    assert "gradient accumulation steps: 2" in one.stdout
    two = torchrun(2, *TINY, *STEPS, "--log_dir", tmp_path / "two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "gradient accumulation steps: 1" in two.stdout and "device: cpu x 2" in two.stdout
    a, b = read_log(tmp_path / "one" / "log.txt"), read_log(tmp_path / "two" / "log.txt")
    assert set(a) == set(b)
    # val losses differ by design: each rank evaluates its own val_steps batches, as in the lecture
    train_keys = [k for k in a if k[1] == "train"]
    assert len(train_keys) == 6
    for key in train_keys:
        assert float(b[key]) == pytest.approx(float(a[key]), abs=1e-4), key
    # only rank 0 writes the log: one line per step and kind
    lines = (tmp_path / "two" / "log.txt").read_text().splitlines()
    assert len(lines) == len(set(lines))
