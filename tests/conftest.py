"""Shared helpers for the tests: the repo's path, a tiny model's flags, running the real scripts."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# a GPT small enough that a CPU step takes milliseconds; vocab stays GPT-2's (padded) so real tokens fit
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--T", "16", "--B", "4",
        "--device", "cpu", "--hellaswag", "0", "--warmup_steps", "2", "--max_lr", "1e-3", "--val_steps", "2",
        "--total_batch_size", "128"]  # 2 micro steps on one process, 1 on two


def env_for_tests(**extra):
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    env.update(extra)
    return env


def run_script(*args, cwd=None, env=None, timeout=240):
    """Run python REPO/<args[0]> <args[1:]> and return the CompletedProcess (text output captured)."""
    cmd = [sys.executable, str(REPO / args[0]), *map(str, args[1:])]
    return subprocess.run(cmd, cwd=cwd, env=env or env_for_tests(), capture_output=True, text=True, timeout=timeout)


def read_log(path):
    """log.txt as {(step, kind): value-string}; a resumed run appends, so the last line of a step wins."""
    out = {}
    for line in Path(path).read_text().splitlines():
        step, kind, value = line.split()
        out[(int(step), kind)] = value
    return out
