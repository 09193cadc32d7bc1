"""DataLoaderLite: rank striding, shards switched by all ranks at once, one global position (resume on another number
of processes), the input.txt fallback, bad shards, and the shuffled epochs."""
import importlib.util
import shutil

import numpy as np
import pytest
import torch

from conftest import REPO
from gpt2_tokenizer import EOT, get_encoding
from train_gpt2 import DataLoaderLite, UsageError

B, T = 2, 8  # 16 tokens a block, 17 read per batch


def write_shards(root, lengths):
    """Shard k holds k*10000 + 0..len-1, so a token's value tells which shard and position it came from."""
    root.mkdir(exist_ok=True)
    for k, n in enumerate(lengths):
        name = f"edufineweb_{'val' if k == 0 else 'train'}_{k:06d}.npy"
        np.save(root / name, (k * 10000 + np.arange(n)).astype(np.uint16))
    return root


def where(x):
    v = int(x[0, 0])
    return v // 10000, v % 10000


def test_rank_reads_its_block_then_strides_by_world_size(tmp_path):
    root = str(write_shards(tmp_path / "d", [100, 1000]))
    loader = DataLoaderLite(B, T, process_rank=1, num_processes=3, data_root=root)
    x, y = loader.next_batch()
    assert x.shape == (B, T) and x.dtype == torch.long
    assert torch.equal(x.flatten(), torch.arange(10016, 10032))  # B*T tokens from position B*T*rank
    assert torch.equal(y.flatten(), torch.arange(10017, 10033))  # the same, shifted by one
    assert x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()  # one buffer, one copy: x, y are views
    assert where(loader.next_batch()[0]) == (1, 16 + 48)  # advanced by B*T*num_processes


def test_ranks_read_disjoint_blocks_and_switch_shards_together(tmp_path):
    # train shards of 1000 and 100 tokens; a stride of 3 ranks is 48 tokens and needs 49
    root = write_shards(tmp_path / "d", [100, 1000, 100])
    loaders = [DataLoaderLite(B, T, r, 3, data_root=str(root)) for r in range(3)]
    schedule = [[where(loader.next_batch()[0]) for loader in loaders] for _ in range(26)]
    # shard 1: strides at 0, 48, ... 912 (960 + 49 > 1000): 20 steps; shard 2: 0 and 48 (96 + 49 > 100); shard 1 again
    expected = [(1, 48 * k) for k in range(20)] + [(2, 0), (2, 48)] + [(1, 48 * k) for k in range(4)]
    for step, reads in enumerate(schedule):
        shard, pos = expected[step]
        assert reads == [(shard, pos + 16 * r) for r in range(3)], step


def test_no_read_runs_past_the_end(tmp_path):
    loader = DataLoaderLite(B, T, data_root=str(write_shards(tmp_path / "d", [100, 50, 33])))
    for _ in range(20):
        x, y = loader.next_batch()
        shard, pos = where(x)
        assert int(y[-1, -1]) == shard * 10000 + pos + 16  # the 17th token read still belongs to the same shard


def test_val_split_reads_shard_zero_and_reset_starts_over(tmp_path):
    loader = DataLoaderLite(B, T, split="val", data_root=str(write_shards(tmp_path / "d", [100, 1000])))
    assert where(loader.next_batch()[0]) == (0, 0)
    loader.next_batch()
    loader.reset()
    assert where(loader.next_batch()[0]) == (0, 0)


def test_state_dict_resumes_the_same_batches_on_another_number_of_processes(tmp_path):
    root = write_shards(tmp_path / "d", [100, 200, 300])
    two = [DataLoaderLite(B, T, r, 2, data_root=str(root)) for r in range(2)]
    for _ in range(7):
        [loader.next_batch() for loader in two]
    one = DataLoaderLite(B, T, 0, 1, data_root=str(root))
    one.load_state_dict(two[0].state_dict())
    for _ in range(3):  # what ranks 0 and 1 read in one micro step, one process reads in two, in the same order
        for loader in two:
            assert torch.equal(loader.next_batch()[0], one.next_batch()[0])


def scripts_copied_to(d):
    """The scripts and input.txt copied to d, and train_gpt2 imported from there: a repository of its own."""
    d.mkdir()
    for name in ("train_gpt2.py", "hellaswag.py", "gpt2_tokenizer.py", "input.txt"):
        shutil.copy(REPO / name, d)
    spec = importlib.util.spec_from_file_location(f"train_gpt2_in_{d.name}", d / "train_gpt2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_data_flag_takes_the_shards_beside_the_script_else_its_input_txt_and_says_so(tmp_path):
    repo = scripts_copied_to(tmp_path / "repo")
    path, note = repo.find_data(None)
    assert path == str(tmp_path / "repo" / "input.txt") and "python fineweb.py makes them" in note
    write_shards(tmp_path / "repo" / "edu_fineweb10B", [100, 1000])  # what python fineweb.py leaves there
    assert repo.find_data(None) == (str(tmp_path / "repo" / "edu_fineweb10B"), None)


def test_a_txt_file_is_split_90_10_into_train_and_val(tmp_path):
    path = str(REPO / "input.txt")
    tokens = get_encoding().encode_ordinary((REPO / "input.txt").read_text(encoding="utf-8"))
    assert DataLoaderLite(4, 32, data_root=path).next_batch()[0].flatten().tolist() == tokens[:128]
    val = DataLoaderLite(4, 32, split="val", data_root=path)
    assert val.next_batch()[0].flatten().tolist() == tokens[int(0.9 * len(tokens)):][:128]


@pytest.mark.parametrize("case, message", [
    ("empty directory", "holds no .npy"), ("one shard", r"give a directory of shards \(not one shard\)"),
    ("truncated", "edufineweb_train_000001.npy is cut short"),
    ("float shard", r"is not 1-D token ids \(float32, shape \(1000,\)\)"),
    ("2-D shard", "is not 1-D token ids"), ("ids beyond the vocabulary", "below vocab_size 50304"),
    ("too small", "lower --B or --T"), ("no val shard", "no val shards"), ("not utf-8", "is not UTF-8")])
def test_bad_data_is_a_usage_error_naming_it(tmp_path, case, message):
    root = write_shards(tmp_path / "d", [100, 1000])
    shard = root / "edufineweb_train_000001.npy"
    data, W = str(root), 1
    if case == "empty directory":
        data = str(tmp_path / "empty")
        (tmp_path / "empty").mkdir()
    elif case == "one shard":
        data = str(shard)
    elif case == "truncated":
        shard.write_bytes(shard.read_bytes()[:1000])
    elif case == "float shard":
        np.save(shard, np.arange(1000, dtype=np.float32))
    elif case == "2-D shard":
        np.save(shard, np.zeros((10, 100), dtype=np.uint16))
    elif case == "ids beyond the vocabulary":
        np.save(shard, np.full(1000, 60000, dtype=np.uint16))
    elif case == "too small":
        W = 70
    elif case == "no val shard":
        (root / "edufineweb_val_000000.npy").unlink()
    else:
        data = str(tmp_path / "latin1.txt")
        (tmp_path / "latin1.txt").write_bytes("café ".encode("latin-1") * 100)
    with pytest.raises(UsageError, match=message):
        DataLoaderLite(B, T, 0, W, split="val" if case == "no val shard" else "train", data_root=data)


def test_int32_shards_of_gpt2_ids_are_read_as_they_are(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    np.save(root / "a_train_1.npy", np.arange(100, dtype=np.int32))
    assert DataLoaderLite(B, T, data_root=str(root)).next_batch()[0].flatten().tolist() == list(range(16))


def document_shards(root, n_shards=3, docs_per_shard=40):
    """Shards of documents [EOT, 100*d + 1, 100*d + 2, ...] (1 to 12 tokens after the EOT): every token but the EOTs
    names its document. Like fineweb.py's, a shard may start in the middle of a document."""
    rng = np.random.default_rng(0)
    stream = np.concatenate([[EOT] + [100 * d + i for i in range(1, rng.integers(2, 14))]
                             for d in range(n_shards * docs_per_shard)]).astype(np.uint16)
    root.mkdir()
    cuts = np.linspace(0, len(stream), n_shards + 1).astype(int)
    for k in range(n_shards):
        np.save(root / f"edufineweb_train_{k + 1:06d}.npy", stream[cuts[k] + 3:cuts[k + 1] + 3] if k < n_shards - 1
                else stream[cuts[k] + 3:])
    return set(stream[3:].tolist()) - {EOT}, root


def read_epoch(loaders):
    """The tokens all ranks read (x) during their first epoch, in order, and the loaders after it."""
    seen = []
    while loaders[0].epoch == 0:
        for loader in loaders:
            seen += loader.next_batch()[0].flatten().tolist()
    return seen


def test_shuffled_epoch_reads_every_document_once_in_a_new_order(tmp_path):
    tokens, root = document_shards(tmp_path / "d")
    loaders = [DataLoaderLite(2, 4, r, 2, data_root=str(root), shuffle=True, seed=5) for r in range(2)]
    seen = [t for t in read_epoch(loaders) if t != EOT]
    assert len(seen) == len(set(seen))  # nothing repeated
    carried = set(loaders[0].tokens[:len(loaders[0].carry)].tolist()) - {EOT}  # the last shard's unread tail
    assert set(seen) | carried == tokens and not set(seen) & carried  # nothing lost: the tail opens epoch 1
    assert len(loaders[0].carry) < 2 * 4 * 2 + 1
    plain = [t for t in read_epoch([DataLoaderLite(2, 4, r, 2, data_root=str(root)) for r in range(2)]) if t != EOT]
    assert seen != plain  # shards and documents in another order than the files'
    docs = [t // 100 for t in seen]
    assert sorted(set(docs)) != [d for i, d in enumerate(docs) if i == 0 or d != docs[i - 1]]
    rank0 = {t // 100 for t in DataLoaderLite(2, 4, 0, 2, data_root=str(root), shuffle=True, seed=5).next_batch()[0]
             .flatten().tolist() if t != EOT}
    rank1 = {t // 100 for t in loaders[1].next_batch()[0].flatten().tolist() if t != EOT}
    assert rank0 != rank1  # each rank its own documents


def test_shuffle_is_seeded_differs_by_epoch_and_resumes_exactly(tmp_path):
    _, root = document_shards(tmp_path / "d")
    a, b = (DataLoaderLite(2, 4, data_root=str(root), shuffle=True, seed=5) for _ in range(2))
    first = [a.next_batch()[0].tolist() for _ in range(300)]  # several epochs
    assert first == [b.next_batch()[0].tolist() for _ in range(300)]  # the same seed, the same order
    epoch0 = [t for t in read_epoch([DataLoaderLite(2, 4, data_root=str(root), shuffle=True, seed=5)])]
    other = DataLoaderLite(2, 4, data_root=str(root), shuffle=True, seed=6)
    assert read_epoch([other]) != epoch0
    resumed = DataLoaderLite(2, 4, data_root=str(root), shuffle=True, seed=5)
    resumed.load_state_dict(a.state_dict())  # (a is past an epoch's end, with a carried tail)
    assert a.epoch > 0 and len(a.carry) > 0
    assert [a.next_batch()[0].tolist() for _ in range(100)] == [resumed.next_batch()[0].tolist() for _ in range(100)]


def test_every_text_target_counts_as_one_in_every_step_shuffled_or_not(tmp_path):
    """A step's micro batches of text weigh 1 each (conversations weigh by their reply tokens), over several epochs
    whose shards carry a tail into the next, on each of 2 ranks."""
    _, root = document_shards(tmp_path / "d")
    for shuffle in (False, True):
        loaders = [DataLoaderLite(2, 4, r, 2, data_root=str(root), shuffle=shuffle, seed=5) for r in range(2)]
        weights = {w for _ in range(150) for loader in loaders for _, _, w in loader.next_step(3)}
        assert weights == {1.0} and loaders[0].epoch > 1, shuffle
