"""The tests hold wherever a person runs them, whoever runs them. Two mechanisms in conftest make it so, and these tests
prove them: every test (and every process it starts) runs under a guard that fails it on any access to the
repository beside its own files, so no test reads or writes what a person keeps there (FineWeb shards, the HellaSwag
file, runs of their own); and the session cleans the environment of what would change a test (a Hugging Face cache of
their own, proxies, HELLASWAG_DIR), which a copy of the repository run in a polluted environment shows."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from conftest import REPO, digests, env_for_tests, hub_cache_with_gpt2


def test_the_guard_records_a_process_that_reads_what_a_person_keeps_in_the_repository(tmp_path):
    """What find_data does without --data (a glob of the repository's edu_fineweb10B/), and an open of its log/."""
    code = ("import glob, os, sys\n"
            "glob.glob(os.path.join(sys.argv[1], 'edu_fineweb10B', '*train*.npy'))\n"
            "try:\n"
            "    open(os.path.join(sys.argv[1], 'log', 'log.txt'))\n"
            "except OSError:\n"
            "    pass\n"
            "open(os.path.join(sys.argv[1], 'input.txt')).close()\n")  # (the repository's own: not recorded)
    r = subprocess.run([sys.executable, "-c", code, str(REPO)], env=env_for_tests(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    record = Path(os.environ["GPT2_TESTS_RECORD"])
    accesses = record.read_text().splitlines()
    record.write_text("")  # (recorded on purpose: not this test's failure)
    assert f"glob.glob {REPO / 'edu_fineweb10B' / '*train*.npy'}" in accesses  # (and the scandir it makes)
    assert f"open {REPO / 'log' / 'log.txt'}" in accesses and not [a for a in accesses if "input.txt" in a]


POLLUTED = '''
import json
import os
import subprocess
import sys

from conftest import REPO, TINY, env_for_tests, offline_env, run_script

CLEANED = ("HF_HUB_CACHE", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")


def test_the_session_cleans_the_environment_of_this_process_and_of_the_processes_it_starts():
    code = "import json, os; print(json.dumps(dict(os.environ)))"
    child = json.loads(subprocess.run([sys.executable, "-c", code], env=env_for_tests(), capture_output=True,
                                      text=True).stdout)
    own = os.path.dirname(os.environ["GPT2_TESTS_RECORD"])  # (the session's own temporary directory)
    for env in (dict(os.environ), child):
        assert not [var for var in CLEANED if var in env]
        assert env["HF_HOME"] == os.path.join(own, "hf-home") and env["HELLASWAG_DIR"].startswith(own)


def test_the_persons_cached_gpt2_is_not_found_and_the_hub_fails_at_once(tmp_path):
    r = run_script("train_gpt2.py", *TINY, "--init_from", "gpt2", "--log_dir", "log", cwd=tmp_path,
                   env=offline_env(tmp_path))
    assert r.returncode == 1 and "could not load gpt2 (cannot connect to huggingface.co" in r.stderr, r.stderr
'''


def test_the_suite_holds_in_a_lived_in_repository_and_leaves_it_alone(tmp_path):
    repo = tmp_path / "repo"  # the repository's files, and beside them what a person's use leaves
    repo.mkdir()
    for p in [*REPO.glob("*.py"), REPO / "input.txt", *REPO.glob("tests/*.py")]:
        (repo / p.relative_to(REPO)).parent.mkdir(exist_ok=True)
        shutil.copy(p, repo / p.relative_to(REPO))
    (repo / "tests" / "test_polluted.py").write_text(POLLUTED)
    (repo / "edu_fineweb10B").mkdir()  # python fineweb.py's names; tokens that no test's numbers come from
    for k in range(3):
        np.save(repo / "edu_fineweb10B" / f"edufineweb_{'val' if k == 0 else 'train'}_{k:06d}.npy",
                np.full(100_000, 42, np.uint16))
    (repo / "hellaswag").mkdir()  # a file that any test reading it would stumble on
    (repo / "hellaswag" / "hellaswag_val.jsonl").write_text('{"ctx": "not an example"}\n')
    (repo / "log").mkdir()  # the person's own run
    (repo / "log" / "log.txt").write_text("0 val 10.9500\n0 train 10.990000\n")
    torch.save({"model": {}, "config": {}, "step": 100}, repo / "log" / "model_00100.pt")
    hub_cache_with_gpt2(tmp_path / "hub")  # (a test that expects no "gpt2" must not find it)
    before = {k: v for k, v in digests(repo).items() if not k.startswith("tests/")}
    proxy = "http://127.0.0.1:9"  # (nothing listens there)
    env = {k: v for k, v in env_for_tests().items() if not k.startswith(("PYTEST_", "GPT2_TESTS_"))}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "hf-home"), http_proxy=proxy,
               https_proxy=proxy, HTTP_PROXY=proxy, HTTPS_PROXY=proxy, PYTHONPATH="")
    env.pop("HELLASWAG_DIR")  # (the copy's conftest sets its own, as this session's did)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_polluted.py"],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "2 passed" in r.stdout, r.stdout[-5000:]
    after = {k: v for k, v in digests(repo).items() if not k.startswith("tests/") and "__pycache__" not in k}
    assert after == before  # the person's shards, HellaSwag file and run: untouched, and nothing added
