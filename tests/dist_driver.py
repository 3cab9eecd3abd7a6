"""Run under ``torchrun --standalone --nproc_per_node=W`` by test_store.py (not a test module).

    torchrun --standalone --nproc_per_node=2 dist_driver.py WORKDIR

Every process builds its share of one gradient store (gloo), then scores top-k with aggregates from
it; the first process saves the result for the test to compare with a one-process run.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

import hessfree  # noqa: E402
from store_cases import CHUNKS, case  # noqa: E402

if __name__ == "__main__":
    work = Path(sys.argv[1])
    dist.init_process_group("gloo")
    run, train, queries = case()
    store = hessfree.store.build_store(run, train, work / "store_w2", progress=False, **CHUNKS)
    top = hessfree.topk_influence(store, None, queries, k=4, aggregate="max", progress=False)
    if dist.get_rank() == 0:
        top.save(work / "topk_w2.npz")
    dist.barrier()
    dist.destroy_process_group()
