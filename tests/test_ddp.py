"""DDP: 2 gloo processes through torchrun equal 1 process with the same total batch by accumulation, on one launcher
and on two launchers (two "nodes" on 127.0.0.1)."""
import random
import socket
import subprocess
import sys

import pytest

from conftest import REPO, RUN, env_for_tests, gloo_threads_at_exit, kill_group, read_log, train_losses


def test_two_gloo_ranks_match_one_process_with_accumulation(shared_run, ddp_run):
    (one, r1), (two, r2) = shared_run, ddp_run
    assert "gradient accumulation steps: 2" in r1.stdout
    assert "gradient accumulation steps: 1" in r2.stdout and "device: cpu x 2" in r2.stdout
    a, b = train_losses(one), train_losses(two)
    assert sorted(a) == sorted(b) == list(range(24))
    for step in a:  # (val losses differ by design: each rank evaluates its own val batches, as in the lecture)
        assert b[step] == pytest.approx(a[step], abs=1e-4), step
    lines = (two / "log.txt").read_text().splitlines()
    assert len(lines) == len(set(lines)) == len(read_log(one / "log.txt"))  # rank 0 alone writes the log
    assert all(f"rank {r} sample {i}: Hello, I'm a language model," in r2.stdout for r in (0, 1) for i in range(4))


def test_each_rank_ends_its_process_group_before_python_shuts_down(ddp_run):
    """A gloo thread still running while Python shuts down can abort the rank ("terminate called without an active
    exception", SIGABRT: a finished run that torchrun reports failed), at random: so none is left at exit."""
    assert gloo_threads_at_exit(ddp_run[0].parent) == {0: [], 1: []}


def free_port():
    """A free port below Linux's ephemeral range (32768 up): no process that the system gives a port to (the
    torchrun --standalone of a test running beside this one) can take it before the launchers bind it."""
    for port in random.sample(range(20000, 32000), 100):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    pytest.fail("no free port in 20000-32000")


def test_two_launchers_as_two_nodes_match_one_launcher(tmp_path, shared_run, ddp_run):
    port = free_port()
    logs = [tmp_path / f"node{node}.txt" for node in (0, 1)]  # (files, not pipes: neither launcher waits on a reader)
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
         "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=test", str(REPO / "train_gpt2.py"),
         *RUN, "--log_dir", "log"], cwd=tmp_path, env=env_for_tests(), stdout=open(logs[node], "w"),
        stderr=subprocess.STDOUT, start_new_session=True) for node in (0, 1)]
    try:
        codes = [p.wait(timeout=300) for p in launchers]
    except subprocess.TimeoutExpired:
        codes = "a launcher hung"
    finally:
        for p in launchers:
            kill_group(p)  # (the launcher and its worker, if any is left)
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], f"{codes}\n{outputs[0][-3000:]}\n{outputs[1][-3000:]}"
    assert "device: cpu x 2" in "".join(outputs)
    assert train_losses(tmp_path / "log") == train_losses(ddp_run[0])  # the same 2 ranks, whatever their launcher
    one = train_losses(shared_run[0])
    assert all(loss == pytest.approx(one[step], abs=1e-4) for step, loss in train_losses(tmp_path / "log").items())
