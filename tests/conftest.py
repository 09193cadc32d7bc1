"""Shared by the tests: the repo's path, a tiny model's flags, the real scripts run as subprocesses, and the training
runs that many tests read (each made once per session)."""
import atexit
import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

# each test process computes on one thread (the suite runs on two processes, one per core)
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The tests hold whatever the person running them keeps around: a Hugging Face cache of their own (empty), a
# HellaSwag directory of their own (none; a test that wants one names it), no proxy (the tests' servers are local,
# and nothing else is reached). Data and log directories are named by every test (TINY's --data, tmp_path).
_OWN = Path(tempfile.mkdtemp(prefix="gpt2-tests-"))
atexit.register(shutil.rmtree, _OWN, True)
for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_DATASETS_CACHE", "HF_ENDPOINT",
            "http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
    os.environ.pop(var, None)
os.environ.update(HF_HOME=str(_OWN / "hf-home"), HELLASWAG_DIR=str(_OWN / "no-hellaswag"))

# ... and leave alone what a person keeps in the repository (FineWeb shards, the HellaSwag file, runs of their own): in
# this process and in every Python process a test starts (env_for_tests), an audit hook records any access to a path
# in the repository beside its own files, and the test that made it fails (repository_untouched, below)
GUARD = """
import os, sys
def _guard(repo=os.environ.get("GPT2_TESTS_REPO"), record=os.environ.get("GPT2_TESTS_RECORD")):
    if not repo or not record:
        return
    own = set(os.environ["GPT2_TESTS_OWN"].split(os.pathsep))
    events = ("open", "os.listdir", "os.scandir", "glob.glob", "os.mkdir", "os.rename", "os.remove", "os.rmdir")
    writing = []
    def hook(event, args):
        if writing or event not in events:
            return
        for path in args[:2] if event == "os.rename" else args[:1]:  # (open's second is its mode)
            if isinstance(path, (str, bytes, os.PathLike)):
                path = os.path.abspath(os.fsdecode(path))
                if path.startswith(repo + os.sep) and path[len(repo) + 1:].split(os.sep)[0] not in own:
                    writing.append(path)
                    with open(record, "a") as f:
                        f.write(event + " " + path + "\\n")
                    writing.pop()
    sys.addaudithook(hook)
_guard()
"""


def own_names():
    """The repository's own top-level names: what git tracks, else (no git here, or git refusing another user's clone)
    the product's files."""
    names = set()
    if shutil.which("git"):
        tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
        names = {line.split("/")[0] for line in tracked.stdout.splitlines()} if tracked.returncode == 0 else set()
    if not names:
        names = {p.name for p in REPO.iterdir() if p.suffix in (".py", ".txt", ".md", ".ipynb")}
        names |= {"tests", "tools", ".ci"}
    return names | {"__pycache__", ".pytest_cache", ".git"}


os.environ.update(GPT2_TESTS_REPO=str(REPO), GPT2_TESTS_OWN=os.pathsep.join(sorted(own_names())),
                  GPT2_TESTS_RECORD=str(_OWN / "repository-accesses"))
(_OWN / "guard").mkdir()
(_OWN / "guard" / "sitecustomize.py").write_text(GUARD)
exec(GUARD)

# a GPT small enough that a CPU step takes milliseconds; the vocabulary stays GPT-2's (padded) so real tokens fit
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--T", "16", "--B", "4",
        "--device", "cpu", "--hellaswag", "0", "--warmup_steps", "2", "--max_lr", "1e-3", "--val_steps", "2",
        "--total_batch_size", "128",  # 2 micro steps on one process, 1 on two
        "--data", str(REPO / "input.txt")]  # (last: a test's own --data after it wins)
# the shared run's flags
RUN = [*TINY, "--max_lr", "1e-2", "--max_steps", "24", "--eval_interval", "8", "--checkpoint_interval", "8"]


def tiny_flops_per_token(n_params):
    """nanoGPT's estimate of training FLOPs per token for TINY's model, computed here from its parameter count: 6N (N
    without the position embeddings, 16 x 16) + 12 L H hs T (L=2, H=2, hs=8, T=16)."""
    return 6 * (n_params - 16 * 16) + 12 * 2 * 2 * 8 * 16


def env_for_tests(site=_OWN / "guard", **extra):
    """The environment of every process a test starts: this session's (above), offline, and the sitecustomize in
    `site` run first (the repository's guard)."""
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    env.update({k: str(v) for k, v in extra.items()})
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    return env


def env_with_sitecustomize(code, directory, **extra):
    """env_for_tests(**extra) in which every Python process started with it runs `code` first (a sitecustomize in
    `directory`, after the guard's)."""
    directory.mkdir(exist_ok=True)
    (directory / "sitecustomize.py").write_text(GUARD + code)
    return env_for_tests(directory, **extra, PYTHONPATH=REPO)


def offline_env(tmp_path, **extra):
    """An environment in which any network connection fails at once. (A download attempt, where none should be,
    fails the test.)"""
    env = env_with_sitecustomize(
        "import socket\n"
        "def _blocked(*args, **kwargs):\n"
        "    raise OSError('network access blocked by the test')\n"
        "socket.socket.connect = socket.socket.connect_ex = _blocked\n"
        "socket.create_connection = _blocked\n", tmp_path / "no-network", **extra)
    env.pop("HF_HUB_OFFLINE")
    return env


def exit_probe_env(out):
    """An environment in which every Python process, at its exit (in atexit, before Python shuts down), writes the
    names of its threads to out/threads.RANK (.launcher: torchrun's own)."""
    return env_with_sitecustomize(
        "import atexit, os\n"
        "def _threads():\n"
        "    names = [open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')]\n"
        "    path = os.path.join(os.environ['THREADS_AT_EXIT'], 'threads.' + os.environ.get('RANK', 'launcher'))\n"
        "    with open(path, 'w') as f:\n"
        "        f.write(' '.join(names))\n"
        "if os.path.isdir('/proc/self/task'):\n"
        "    atexit.register(_threads)\n", _OWN / "exit-probe", THREADS_AT_EXIT=out)


def gloo_threads_at_exit(out, ranks=(0, 1)):
    """The threads of gloo (a process group's) that each rank still ran when its Python began to shut down."""
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("no /proc/self/task here to read a process's threads from")
    names = {r: (Path(out) / f"threads.{r}").read_text().split() for r in ranks}
    assert all(names.values()), names  # (the main thread at least)
    return {r: [n for n in v if "gloo" in n] for r, v in names.items()}


def run_script(*args, cwd=None, env=None, timeout=300, input=None):
    """python REPO/<args[0]> <args[1:]>, its output captured (and `input` its stdin)."""
    cmd = [sys.executable, str(REPO / args[0]), *map(str, args[1:])]
    return subprocess.run(cmd, cwd=cwd, env=env or env_for_tests(), capture_output=True, text=True, timeout=timeout,
                          input=input)


def run_main(capsys, cwd, *args):
    """train_gpt2.main(args) in this process, in cwd: what run_script returns, without a second start of torch
    (for a run that needs no process of its own: no signal, no kill, no resource limit). capsys None: the output
    caught here (a session fixture's run). The SIGTERM and SIGINT handlers the training loop sets are put back after,
    and its wakeup fd closed."""
    import train_gpt2
    handlers, old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}, os.getcwd()
    caught = [io.StringIO(), io.StringIO()]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(caught[0]) if capsys is None else contextlib.nullcontext(), \
                contextlib.redirect_stderr(caught[1]) if capsys is None else contextlib.nullcontext():
            train_gpt2.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        os.chdir(old)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        wakeup = signal.set_wakeup_fd(-1)  # (the training loop's, to its signal thread: closed, the thread ends)
        if wakeup != -1:
            os.close(wakeup)
    out, err = capsys.readouterr() if capsys is not None else (c.getvalue() for c in caught)
    return subprocess.CompletedProcess(args, code, out, err)


def torchrun_cmd(nproc, *args, extra=()):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra,
            str(REPO / "train_gpt2.py"), *map(str, args)]


def torchrun(nproc, *args, cwd, extra=(), timeout=300, env=None):
    return subprocess.run(torchrun_cmd(nproc, *args, extra=extra), cwd=cwd, env=env or env_for_tests(),
                          capture_output=True, text=True, timeout=timeout)


def read_log(path):
    """log.txt as {(step, kind): value-string}; where a resumed run logged a step again, the last line wins."""
    out = {}
    for line in Path(path).read_text().splitlines():
        step, kind, value = line.split()
        out[(int(step), kind)] = value
    return out


def train_losses(log_dir):
    return {k[0]: float(v) for k, v in read_log(Path(log_dir) / "log.txt").items() if k[1] == "train"}


def start(cmd, cwd, env=None):
    """A process in a session of its own (its whole group can be signalled), stdout and stderr in one pipe."""
    return subprocess.Popen(cmd, cwd=cwd, env=env or env_for_tests(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_for_line(proc, needle, timeout=120):
    """Read the process's output until a line holds `needle`; return all lines read so far."""
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if needle in line:
            return lines
        assert time.time() < deadline, f"no line with {needle!r} within {timeout}s"
    pytest.fail(f"the process ended without a line with {needle!r}:\n{''.join(lines)[-3000:]}")


def finish(proc, timeout=120):
    """The rest of the process's output, once it has ended (killed if it takes longer than timeout)."""
    watchdog = threading.Timer(timeout, kill_group, [proc])
    watchdog.start()
    try:
        out = proc.stdout.read()  # (not communicate(timeout=...): it would skip what the pipe's reader buffered)
        proc.wait()
    finally:
        watchdog.cancel()
    return out


def made_once(tmp_path_factory, name, make):
    """(d / "log", the run's CompletedProcess) of make(d), made once per test session: under pytest-xdist the first
    worker to ask makes it in a directory all the workers share (a lock in between), the others read it."""
    if "PYTEST_XDIST_WORKER" not in os.environ:  # (one process)
        d = tmp_path_factory.mktemp(name)
        return d / "log", make(d)
    d = tmp_path_factory.getbasetemp().parent / name  # (this session's, shared by its workers)
    with open(f"{d}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (d / "run.json").exists():
            d.mkdir()
            r = make(d)
            (d / "run.json").write_text(json.dumps([r.returncode, r.stdout, r.stderr]))
    code, out, err = json.loads((d / "run.json").read_text())
    return d / "log", subprocess.CompletedProcess(name, code, out, err)


def digests(root):
    """{path relative to root: sha256} of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(root).rglob("*"))
            if p.is_file()}


def far_gpt2(directory, n_positions=64):
    """A tiny transformers GPT-2 written by save_pretrained into directory, its weights far from a fresh init
    (N(0, 0.5)): only a faithful loading of it gives transformers' own numbers. Returns the directory."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=n_positions, n_embd=32, n_layer=2, n_head=2))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    model.save_pretrained(directory)
    return directory


def mean_val_loss(logits_of, tokens, B, T, steps):
    """The val loss by hand: the mean of the losses of `steps` batches of B*T+1 tokens read at 0, B*T, 2*B*T, ..."""
    import torch.nn.functional as F
    losses = [F.cross_entropy(logits_of(tokens[s:s + B * T].view(B, T)).flatten(0, 1).float(),
                              tokens[s + 1:s + B * T + 1]).item() for s in range(0, steps * B * T, B * T)]
    return sum(losses) / len(losses)


class MakesAFile:
    """Unpickled, it creates a file: the code a pickle can carry."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def hub_cache_with_gpt2(hub):
    """A Hugging Face hub cache (what HF_HUB_CACHE names) that holds a "gpt2": a tiny one, as a download leaves it."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    snapshot = hub / "models--gpt2" / "snapshots" / ("0" * 40)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(
        snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    return hub


# HellaSwag-format files (HELLASWAG_DIR names the directory)
WORDS = ("a man woman dog is are was holds takes walks runs throws the ball into water over field then "
         "slowly quickly and with his her red blue small large kitchen knife cuts bread").split()


def text(n, seed):
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(n))


def make_examples():
    """Eight examples: endings of very different lengths (so summed and mean loss disagree), one context long enough
    that its rows pass 64 tokens (two length buckets), and every label."""
    lengths = [(6, (2, 9, 4, 14)), (12, (7, 3, 11, 5)), (70, (5, 12, 3, 8)), (9, (15, 2, 6, 10)),
               (4, (3, 3, 12, 6)), (20, (9, 13, 2, 7)), (15, (4, 10, 6, 2)), (8, (11, 5, 8, 3))]
    return [{"ind": k, "ctx": text(n_ctx, k).capitalize(), "label": k % 4,
             "endings": [text(n, k * 4 + j + 1) + "." for j, n in enumerate(ends)]}
            for k, (n_ctx, ends) in enumerate(lengths)]


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def hellaswag_dir(directory, examples):
    """A directory holding hellaswag_val.jsonl of these examples: what HELLASWAG_DIR names."""
    write_jsonl(directory / "hellaswag_val.jsonl", examples)
    return directory


# conversations (--data FILE.jsonl): user turns of random words, the replies fixed, so that only a loss that counts the
# replies alone can fall near 0
REPLY = "I am a small model."


def write_chats(path, n=100, seed=0):
    """n conversations of one or two exchanges (a system message in every fifth) into a .jsonl file; returns it."""
    import random
    rng = random.Random(seed)
    records = []
    for i in range(n):
        messages = [{"role": "system", "content": "Be brief."}] if i % 5 == 0 else []
        for _ in range(1 + i % 2):
            messages += [{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 8)))},
                         {"role": "assistant", "content": REPLY}]
        records.append({"messages": messages})
    return write_jsonl(path, records)


# a model that learns them in seconds: chat_run's flags, and one step's tokens in one micro batch
CHAT = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64", "--T", "64", "--B", "2",
        "--total_batch_size", "128", "--device", "cpu", "--hellaswag", "0", "--val_steps", "2", "--max_lr", "1e-2",
        "--warmup_steps", "3"]


@pytest.fixture(scope="session")
def chat_run(tmp_path_factory):
    """A tiny GPT trained from scratch on 200 conversations for 40 steps, shuffled by conversation, on 2 ranks under
    FSDP (B=1 each: the same step)."""
    def make(d):
        return torchrun(2, *CHAT, "--B", "1", "--fsdp", "1", "--data", write_chats(d / "chats.jsonl", 200),
                        "--max_steps", "40", "--eval_interval", "20", "--shuffle", "1", "--log_dir", d / "log", cwd=d)
    log, r = made_once(tmp_path_factory, "chat", make)
    assert r.returncode == 0, r.stderr[-3000:]
    return log, r


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory):
    """One tiny 24-step run (checkpoints at 8, 16, 24): the yardstick for resumed runs, and the model that the
    sampling, export and evaluation tests load (read-only: a test that writes copies it)."""
    log, r = made_once(tmp_path_factory, "shared",
                       lambda d: run_script("train_gpt2.py", *RUN, "--log_dir", d / "log", cwd=d))
    assert r.returncode == 0, r.stderr
    return log, r


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory):
    """The shared run's flags on 2 gloo processes through torchrun: the yardstick for the multi-process tests. (Its
    threads at exit in log/../threads.RANK.)"""
    log, r = made_once(tmp_path_factory, "ddp", lambda d: torchrun(2, *RUN, "--log_dir", d / "log", cwd=d,
                                                                   env=exit_probe_env(d)))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return log, r


@pytest.fixture(autouse=True)
def repository_untouched():
    """Every test, and every process it starts, leaves alone what is in the repository beside its own files."""
    record = Path(os.environ["GPT2_TESTS_RECORD"])
    record.write_text("")
    yield
    accesses = sorted(set(record.read_text().splitlines()))
    record.write_text("")
    assert not accesses, f"the test touched the repository beside its own files: {accesses[:5]}"


def kill_group(proc, sig=signal.SIGKILL):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory that cannot be written, by root too: chmod 555, and where that is not enough (root), a read-only
    tmpfs mounted on it."""
    d = tmp_path / "read-only"
    d.mkdir()
    d.chmod(0o555)
    mounted = False
    try:
        (d / "probe").touch()
        (d / "probe").unlink()
        if shutil.which("mount") is None:
            pytest.skip("no way to make a read-only directory here (root, and no mount command)")
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)]).returncode == 0
        if not mounted:
            pytest.skip("no way to make a read-only directory here (root, and mount is not allowed)")
    except PermissionError:
        pass
    yield d
    if mounted:
        subprocess.run(["umount", str(d)])
    d.chmod(0o755)
