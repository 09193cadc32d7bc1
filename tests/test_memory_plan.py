"""tools/memory_plan.py --quick: the measurements the plan stands on, and its check against a measured peak."""
import re

import pytest

from conftest import run_script


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The output of one run of tools/memory_plan.py --quick."""
    r = run_script("tools/memory_plan.py", "--quick", cwd=tmp_path_factory.mktemp("memory_plan"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def test_the_memory_plan_measures_what_it_plans_from_and_matches_a_measured_peak(quick):
    # float32 weights (4 bytes), their gradients (4) and AdamW's two moments (8)
    assert "state: 16.00 bytes a parameter" in quick
    # autocast's bfloat16 copy of every weight (2 bytes), kept from the forward to the backward
    assert "a forward keeps 2.00 bytes a block parameter" in quick
    found = re.search(r"bf16 autocast: a token keeps ([\d.]+) KiB a block \(([\d.]+) KiB checkpointed\)", quick)
    block, checkpointed = map(float, found.groups())
    assert checkpointed == 3.0 < block / 3  # a checkpointed block keeps its input (768 float32 values) alone
    rows = [line for line in quick.splitlines() if line.startswith("| gpt2 |")]
    assert [row.split("|")[2].strip() for row in rows[:4]] == ["DDP", "DDP + AC", "FSDP", "FSDP + AC"]
    # the plan of a float32 step against the peak resident memory the step really took, measured in a process of its own
    planned, measured = map(int, re.search(r"planned (\d+) MiB, measured peak (\d+) MiB", quick).groups())
    assert 0.85 <= planned / measured <= 1.15


def test_the_memory_plan_measures_a_lora_model_as_train_holds_it(quick):
    """LoRA at rank 8, after a real step under bf16 autocast: the frozen weights in bf16 with no gradient and no AdamW
    state, the adapters trained in float32, and the activations the LoRA model keeps."""
    # bf16 weights (2 bytes) alone; the adapters: float32 weights (4), gradients (4) and AdamW's two moments (8)
    assert "LoRA r=8 state: 2.00 bytes a frozen parameter" in quick and "16.00 bytes an adapter parameter" in quick
    # autocast copies the adapters alone (2 bytes each): the frozen weights are bf16 already
    assert "a forward keeps 2.00 bytes an adapter parameter" in quick
    full = float(re.search(r"bf16 autocast: a token keeps ([\d.]+) KiB a block", quick).group(1))
    found = re.search(r"LoRA r=8, .*?: a token keeps ([\d.]+) KiB a block \(([\d.]+) KiB checkpointed\) and ([\d.]+) "
                      r"KiB for the rest", quick)
    block, checkpointed, rest = map(float, found.groups())
    # a frozen Linear keeps no input for its weight's gradient, but its adapter keeps the same one for A's; the
    # residual stream is bf16 (the frozen embeddings are), so are the LayerNorms' inputs: a LoRA block of width 768
    # keeps, a token, 2 bytes of each of the two LayerNorms' inputs (768) and statistics (2), of the adapters' inputs
    # (768, 768, 3072; attn.c_proj's is attention's output), of q, k and v (3 x 768), attention's output (768), GELU's
    # input (3072) and each adapter's rank-8 product (4 x 8), and attention's 12 float32 log-sum-exps: 24696 bytes
    assert block == 24.1 < full
    assert checkpointed == 1.5  # its input alone: 768 bf16 values
    assert 196.5 <= rest < 197.5  # the loss's 50304 float32 log-probabilities a token; the frozen head keeps no input
    lines = quick.splitlines()
    rows = [line for line in lines if line.startswith("| gpt2 | LoRA")]
    assert [row.split("|")[2].strip() for row in rows] == ["LoRA r=8", "LoRA r=8 + AC"]
    assert [line for line in lines if line.startswith("| model |")][-1].endswith(
        "| largest B: 8 GB | 12 GB | 16 GB | 24 GB |")
    ddp = [line for line in lines if line.startswith("| gpt2 | DDP |")][0]
    # at B=1: 2 bytes a parameter of state instead of 16 (124.5M parameters: 1.74 GB less), no bf16 copies of the
    # weights (0.17 GB), and a little less of activations: 1.9 GB less (the table's 0.1 GB steps: 1.8 to 2.0)
    assert 1.8 <= float(ddp.split("|")[3]) - float(rows[0].split("|")[3]) <= 2.0
