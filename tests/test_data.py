"""DataLoaderLite: rank striding, shard rollover, no overlap between ranks, the input.txt fallback, bad shards."""
import numpy as np
import pytest
import torch

from conftest import REPO
from train_gpt2 import DataLoaderLite, UsageError

B, T = 2, 8  # 16 tokens a block, 17 read per batch


def write_shards(root, lengths):
    """Shard k holds k*10000 + 0..len-1, so a token's value tells which shard and position it came from."""
    root.mkdir(exist_ok=True)
    for k, n in enumerate(lengths):
        split = "val" if k == 0 else "train"
        np.save(root / f"edufineweb_{split}_{k:06d}.npy", (k * 10000 + np.arange(n)).astype(np.uint16))
    return root


def where(x):
    """(shard, position) of a batch from the value of its first token."""
    v = int(x[0, 0])
    return v // 10000, v % 10000


def test_rank_reads_its_block_then_strides_by_world_size(tmp_path):
    root = write_shards(tmp_path / "d", [100, 1000])
    loader = DataLoaderLite(B, T, process_rank=1, num_processes=3, split="train", data_root=str(root))
    x, y = loader.next_batch()
    assert x.shape == (B, T) and x.dtype == torch.long
    assert torch.equal(x.flatten(), torch.arange(10016, 10032))  # B*T tokens from position B*T*rank
    assert torch.equal(y.flatten(), torch.arange(10017, 10033))  # the same shifted by one
    x, _ = loader.next_batch()
    assert where(x) == (1, 16 + 48)  # advanced by B*T*num_processes


def test_ranks_cover_every_block_that_fits_once_and_roll_over(tmp_path):
    # train shards of 1000 and 40 tokens: blocks start every 16 tokens and need 17
    root = write_shards(tmp_path / "d", [100, 1000, 40])
    W = 3
    seen = {}
    for rank in range(W):
        loader = DataLoaderLite(B, T, process_rank=rank, num_processes=W, split="train", data_root=str(root))
        reads = []
        while True:
            x, _ = loader.next_batch()
            if reads and where(x) == reads[0]:
                break  # wrapped around to the first read
            reads.append(where(x))
        seen[rank] = reads
        assert reads[0] == (1, 16 * rank)
    # in the 1000-token shard, blocks 0..61 fit (61*16+17 = 993 <= 1000; 62*16+17 = 1009 does not)
    for shard, n_blocks in ((1, 62), (2, 2)):  # the 40-token shard: blocks 0 and 1 fit (16+17 = 33), 2 does not
        per_rank = [{p for s, p in seen[r] if s == shard} for r in range(W)]
        union = set().union(*per_rank)
        assert union == {16 * j for j in range(n_blocks)}, shard
        assert sum(len(s) for s in per_rank) == len(union)  # no block read by two ranks
        for r in range(W):
            assert all(p % (16 * W) == 16 * r for p in per_rank[r])


def test_no_read_runs_past_the_end(tmp_path):
    root = write_shards(tmp_path / "d", [100, 50, 33])
    loader = DataLoaderLite(B, T, split="train", data_root=str(root))
    for _ in range(20):
        x, y = loader.next_batch()
        shard, pos = where(x)
        # y's last token is the 17th token read: it must still belong to the same shard
        assert int(y[-1, -1]) == shard * 10000 + pos + 16


def test_val_split_reads_shard_zero(tmp_path):
    root = write_shards(tmp_path / "d", [100, 1000])
    loader = DataLoaderLite(B, T, split="val", data_root=str(root))
    assert where(loader.next_batch()[0]) == (0, 0)
    loader.next_batch()
    loader.reset()
    assert where(loader.next_batch()[0]) == (0, 0)


def test_state_dict_resumes_the_same_batches(tmp_path):
    root = write_shards(tmp_path / "d", [100, 200, 300])
    a = DataLoaderLite(B, T, process_rank=1, num_processes=2, split="train", data_root=str(root))
    for _ in range(7):
        a.next_batch()
    b = DataLoaderLite(B, T, process_rank=1, num_processes=2, split="train", data_root=str(root))
    b.load_state_dict(a.state_dict())
    for _ in range(10):
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])


def test_directory_without_shards_falls_back_to_input_txt(tmp_path, capsys):
    from gpt2_tokenizer import get_encoding
    (tmp_path / "empty").mkdir()
    loader = DataLoaderLite(4, 32, split="train", data_root=str(tmp_path / "empty"))
    assert "input.txt" in capsys.readouterr().out
    tokens = get_encoding().encode_ordinary((REPO / "input.txt").read_text(encoding="utf-8"))
    x, y = loader.next_batch()
    assert x.flatten().tolist() == tokens[:128]
    val = DataLoaderLite(4, 32, split="val", data_root=str(tmp_path / "empty"), master_process=False)
    assert val.next_batch()[0].flatten().tolist() == tokens[int(0.9 * len(tokens)):][:128]


def test_truncated_shard_is_named_in_the_error(tmp_path):
    root = write_shards(tmp_path / "d", [100, 1000])
    shard = root / "edufineweb_train_000001.npy"
    shard.write_bytes(shard.read_bytes()[:1000])  # cut mid-data
    with pytest.raises(UsageError, match="edufineweb_train_000001.npy is truncated"):
        DataLoaderLite(B, T, split="train", data_root=str(root))


def test_shard_of_the_wrong_dtype_is_an_error(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    np.save(root / "edufineweb_train_000001.npy", np.arange(1000, dtype=np.int32))
    with pytest.raises(UsageError, match="uint16"):
        DataLoaderLite(B, T, split="train", data_root=str(root))


def test_shards_too_small_for_one_step_is_an_error(tmp_path):
    root = write_shards(tmp_path / "d", [100, 40])
    with pytest.raises(UsageError, match="lower --B or --T"):
        DataLoaderLite(B, T, process_rank=0, num_processes=4, split="train", data_root=str(root))


def test_missing_val_shards_is_an_error(tmp_path):
    root = write_shards(tmp_path / "d", [100, 1000])
    (root / "edufineweb_val_000000.npy").unlink()
    with pytest.raises(UsageError, match="no val shards"):
        DataLoaderLite(B, T, split="val", data_root=str(root))
