"""The tests hold wherever a person runs them: here, in a copy of the repository that holds what its users keep there
(FineWeb shards from python fineweb.py, the HellaSwag file, a log of their own run, a populated Hugging Face cache named
by HF_HUB_CACHE, a proxy in the environment, no mount command), the shared fixtures and the tests most exposed to those
run as they do in a clean clone, and leave the person's files alone."""
import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import torch

from conftest import REPO, env_for_tests, hub_cache_with_gpt2

EXPOSED = [  # the shared fixtures' readers, and a test per thing a person keeps
    "tests/test_train.py::test_the_run_learns_and_logs_as_the_lecture_and_prints_what_a_person_reads",
    "tests/test_data.py::test_no_data_flag_takes_the_shards_beside_the_script_else_its_input_txt_and_says_so",
    "tests/test_hellaswag.py::test_training_logs_hellaswag_in_the_lectures_format",
    "tests/test_hellaswag.py::test_download_keeps_a_file_of_valid_examples",
    "tests/test_sample_export.py::test_hub_weights_without_network_fail_fast_in_one_line",
    "tests/test_sample_export.py::test_sampling_prints_every_sample_drawn_for_the_seed",
    "tests/test_train.py::test_a_log_dir_that_cannot_be_written_is_one_line_before_step_0",
]


def digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def lived_in_copy(repo):
    """The repository's files, and beside them what a person's use leaves."""
    repo.mkdir()
    for p in [*REPO.glob("*.py"), REPO / "input.txt", *REPO.glob("tests/*.py")]:
        (repo / p.relative_to(REPO)).parent.mkdir(exist_ok=True)
        shutil.copy(p, repo / p.relative_to(REPO))
    shards = repo / "edu_fineweb10B"  # python fineweb.py's names; tokens that no test's numbers come from
    shards.mkdir()
    for k in range(3):
        np.save(shards / f"edufineweb_{'val' if k == 0 else 'train'}_{k:06d}.npy", np.full(100_000, 42, np.uint16))
    (repo / "hellaswag").mkdir()  # a file that any test reading it would stumble on
    (repo / "hellaswag" / "hellaswag_val.jsonl").write_text('{"ctx": "not an example"}\n')
    (repo / "log").mkdir()  # the person's own run
    (repo / "log" / "log.txt").write_text("0 val 10.9500\n0 train 10.990000\n")
    torch.save({"model": {}, "config": {}, "step": 100}, repo / "log" / "model_00100.pt")


def path_without_mount(bin_dir):
    """A PATH of every command on this one but mount and umount."""
    bin_dir.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        for name in os.listdir(d) if os.path.isdir(d) else []:
            if name not in ("mount", "umount") and not (bin_dir / name).exists():
                os.symlink(os.path.join(d, name), bin_dir / name)
    return str(bin_dir)


def test_the_shared_fixtures_and_the_exposed_tests_hold_in_a_lived_in_repository(tmp_path):
    repo = tmp_path / "repo"
    lived_in_copy(repo)
    hub_cache_with_gpt2(tmp_path / "hub")  # (a test that expects no "gpt2" must not find it)
    before = {k: v for k, v in digests(repo).items() if not k.startswith("tests/")}
    proxy = "http://127.0.0.1:9"  # (nothing listens there)
    env = env_for_tests(HF_HUB_CACHE=tmp_path / "hub", HF_HOME=tmp_path / "hf-home", http_proxy=proxy,
                        https_proxy=proxy, HTTP_PROXY=proxy, HTTPS_PROXY=proxy,
                        PATH=path_without_mount(tmp_path / "bin"))
    env.pop("HELLASWAG_DIR")  # (the tests' own, set by this session's conftest: the copy's conftest sets its own)
    for var in [var for var in env if var.startswith("PYTEST_")]:  # (this session's workers': not the copy's)
        env.pop(var)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *EXPOSED], cwd=repo,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-5000:]
    summary = r.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"{len(EXPOSED) - 1} passed, 1 skipped"), summary
    assert "no way to make a read-only directory here (root, and no mount command)" in r.stdout
    after = {k: v for k, v in digests(repo).items() if not k.startswith("tests/") and "__pycache__" not in k}
    assert after == before  # the person's shards, HellaSwag file and run: untouched, and nothing added
