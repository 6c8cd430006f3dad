"""Two gloo ranks leaving the process group through `end_process_group`; each rank writes how long it waited there.

    torchrun --nproc_per_node 2 tests/workers/process_group_teardown.py MODE LATE TIMEOUT OUT_DIR

MODE `late_peer`: rank 1 arrives LATE seconds after rank 0, which must wait for it.
MODE `gone_peer`: rank 1 leaves without tearing anything down (as a crashed rank would), and rank 0 must still exit,
within TIMEOUT seconds.
"""

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from diverse_vit_hf.utils.distributed import end_process_group


def main() -> None:
    mode, late, timeout, out = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    dist.barrier()  # both ranks are connected before either leaves
    if rank == 1:
        if mode == "gone_peer":
            os._exit(0)
        time.sleep(late)
    start = time.monotonic()
    end_process_group(timedelta(seconds=timeout))
    waited = time.monotonic() - start
    (out / f"rank-{rank}.json").write_text(json.dumps({"waited": waited, "initialized": dist.is_initialized()}))


if __name__ == "__main__":
    main()
