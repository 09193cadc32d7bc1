"""tools/memory_plan.py --quick: the measurements the plan stands on, and its check against a measured peak."""
import re

from conftest import run_script


def test_the_memory_plan_measures_what_it_plans_from_and_matches_a_measured_peak(tmp_path):
    r = run_script("tools/memory_plan.py", "--quick", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = r.stdout
    # float32 weights (4 bytes), their gradients (4) and AdamW's two moments (8)
    assert "state: 16.00 bytes a parameter" in out
    # autocast's bfloat16 copy of every weight (2 bytes), kept from the forward to the backward
    assert "a forward keeps 2.00 bytes a block parameter" in out
    found = re.search(r"keeps ([\d.]+) KiB a block \(([\d.]+) KiB checkpointed\)", out)
    block, checkpointed = map(float, found.groups())
    assert checkpointed < block / 3  # a checkpointed block keeps its input (768 float32 values), not its activations
    rows = [line for line in out.splitlines() if line.startswith("| gpt2 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["DDP", "DDP + AC", "FSDP", "FSDP + AC"]
    # the plan of a float32 step against the peak resident memory the step really took, measured in a process of its own
    planned, measured = map(int, re.search(r"planned (\d+) MiB, measured peak (\d+) MiB", out).groups())
    assert 0.85 <= planned / measured <= 1.15
