"""The README's commands: each one's flags parse with the real programs' parsers, and the walk from your own text to
a transformers pipeline runs as written, in a fresh copy of the repository, offline. (One change: its training
command trains a tiny model, flags added at the end, which argparse lets override; the preset's model takes a
minute here.)"""
import re
import shlex
import shutil
import subprocess
import sys

import fineweb
import train_gpt2
from conftest import REPO, TINY, offline_env

README = (REPO / "README.md").read_text()


def blocks():
    """{the paragraph before it: [argv of each command]} of every bash block."""
    out = {}
    for lead, body in re.findall(r"([^\n]*)\n+```bash\n(.*?)```", README, re.S):
        out[lead] = [shlex.split(line, comments=True) for line in body.splitlines() if line.strip()]
    return out


def commands():
    return [argv for argvs in blocks().values() for argv in argvs]


def test_the_test_command_is_the_one_ci_runs():
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == "python -m pytest -q -n 2 tests"
    assert shlex.split(ci) in commands()


def test_the_cpu_torch_is_the_pinned_version():
    pin = re.search(r"^torch==(\S+)$", (REPO / "requirements.txt").read_text(), re.M).group(1)
    assert ["pip", "install", f"torch=={pin}", "--index-url", "https://download.pytorch.org/whl/cpu"] in commands()


def program_args(argv):
    """(script, its arguments) of `python X.py ...`, `torchrun ... X.py ...` (environment settings first)."""
    while "=" in argv[0]:
        argv = argv[1:]
    scripts = [i for i, a in enumerate(argv) if a.endswith(".py")]
    return (argv[scripts[0]], argv[scripts[0] + 1:]) if scripts else (None, argv)


def test_every_command_names_real_files_and_flags(monkeypatch):
    monkeypatch.chdir(REPO)  # (fineweb.py's --input input.txt)
    checked = 0
    for argv in commands():
        script, args = program_args(argv)
        if script is not None:
            assert (REPO / script).is_file(), argv
        if script == "train_gpt2.py":
            train_gpt2.build_parser().parse_args(args)  # (argparse exits on an unknown flag or a bad value)
        elif script == "fineweb.py":
            fineweb.parse_args(args)
        else:
            continue
        checked += 1
    assert checked >= 9


def test_own_text_to_a_transformers_pipeline_as_written(tmp_path):
    walk = blocks()["## Your own text, start to finish"]
    for name in ("train_gpt2.py", "fineweb.py", "hellaswag.py", "gpt2_tokenizer.py", "input.txt"):
        shutil.copy(REPO / name, tmp_path)
    out = []
    for argv in walk:
        assert argv[0] == "python"
        if argv[1] == "train_gpt2.py" and "--data" in argv:
            argv = [*argv, *TINY[:-2], "--block_size", "32", "--T", "32"]  # (its own --data; 20 tokens fit)
        r = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=offline_env(tmp_path), capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, f"{shlex.join(argv)}\n{r.stderr[-3000:]}"
        out.append(r.stdout)
    shards, trained, sampled, exported, generated = out
    assert "(9 shards)" in shards and "val" in shards  # 1 val and 9 train shards
    assert "schedule: warmup" in trained and "done in" in trained and "final val loss" in trained
    assert sampled.startswith("sampling from") and "\nROMEO:" in sampled
    assert "exported" in exported
    assert generated.startswith("ROMEO:") and len(generated) > len("ROMEO:\n")  # the prompt and more
