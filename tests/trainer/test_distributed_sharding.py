"""The weight-level term under FSDP2: two gloo processes with `fully_shard` against one unsharded process
(tests/workers/fsdp2_weight_term.py): the same loss terms at every step and the same parameters after the updates, with
the released (fresh start vectors) and the persistent power estimator."""

from __future__ import annotations

import json
import sys

import pytest
from fixtures.scripts import SCRIPT_ENV, WORKERS, run_checked

SCRIPT = WORKERS / "fsdp2_weight_term.py"
ENV = {**SCRIPT_ENV, "OMP_NUM_THREADS": "1"}


def run(tmp_path, name: str, processes: int, *mode: str) -> dict:
    out = tmp_path / f"{name}.json"
    if processes == 1:
        command = [sys.executable, str(SCRIPT), str(out), *mode]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--standalone", str(SCRIPT), str(out), *mode]  # fmt: skip
    run_checked(command, env=ENV, timeout=600)
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("mode", [(), ("persistent",)], ids=["fresh-start", "persistent"])
def test_fsdp2_two_processes_match_one_unsharded_process(tmp_path, mode):
    reference, sharded = run(tmp_path, "one", 1, *mode), run(tmp_path, "two", 2, *mode)
    assert (reference["world"], sharded["world"]) == (1, 2)
    for step, (expected, got) in enumerate(zip(reference["steps"], sharded["steps"], strict=True)):
        assert set(got) == set(expected) and got["loss_weight_condition"] > 0
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-7), (step, name)
    for name, values in reference["parameters"].items():
        difference = max(abs(a - b) for a, b in zip(values, sharded["parameters"][name], strict=True))
        assert difference < 5e-4, (name, difference)  # a wrong gradient moves AdamW's first steps by ~lr = 1e-2
    # The gather: one all-gather per Q/K/V matrix (2 blocks x 3), half of the fp32 (3 * 2, 32, 32) stack per rank.
    for gathered in sharded["gathered"]:
        assert gathered["collectives"] == 6
        assert gathered["bytes_received_per_rank"] == 6 * 32 * 32 * 4 // 2
