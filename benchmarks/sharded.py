"""Masks and the exact global threshold under FSDP2 sharding: 1 against 2 processes, per-rank memory and masks.

    .venv/bin/python benchmarks/sharded.py            # 50M and 200M weights
    .venv/bin/python benchmarks/sharded.py --quick    # 4M weights: a smoke test

The model is a stack of bias-free ``nn.Linear(4096, 4096)`` layers (plus one shorter layer for the remainder), each
sharded by ``fully_shard`` (FSDP2, the code path of Lightning's ``ModelParallelStrategy``) over a gloo group of 1 or 2
CPU processes. It is built on the meta device and materialised shard by shard (``to_empty``), so each rank only
ever holds its own rows; every weight is a function of its global index (``round(1024 * sin(0.618 * i)) / 1024``:
about 2,000 distinct magnitudes, so the threshold cuts through large tie groups), the same whatever the number of
processes.

Each rank is a fresh process and reports the rise of its ``ru_maxrss`` while it builds the masks
(``mask_set_for``: one bool per local weight) and prunes 90% of the weights with one global magnitude threshold
(``Unstructured().prune_``: histograms summed over the ranks), and the wall time of the pruning alone; beside it
the change of its file-backed resident pages (``RssFile``: code and mapped files, which a first use of a code path
can fault in; the warm-up on a tiny sharded model runs the same path first, so this stays near zero). Every rank
writes its mask shards, bit-packed; the driver puts them together and checks they are bit-identical to the
1-process masks. Memory and mask equality do not depend on the machine's load; times do: they are reported with
the load of the processes outside the job, and marked contended when those used more than ``--max-other-load``
cores meanwhile.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import OtherLoad, environment, markdown_table

COLS = 4096
SPARSITY = 0.9
MB = 1e6


def _shapes(numel: int) -> list[tuple[int, int]]:
    rows, rest = divmod(numel, COLS)
    shapes = [(COLS, COLS)] * (rows // COLS)
    if rows % COLS:
        shapes.append((rows % COLS, COLS))
    if rest:
        raise ValueError(f"the size must be a multiple of {COLS}, got {numel}")
    return shapes


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_file_bytes() -> int:
    """The file-backed part of the resident set (code pages, mapped files): ``RssFile`` of ``/proc/self/status``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    return 0


# --------------------------------------------------------------------------------------------- worker
def _worker(rank: int, world: int, port: int, numel: int, out: Path) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_prune.criteria import MagnitudeImportance
    from lightning_prune.masks import mask_set_for, prunable_parameters
    from lightning_prune.structures import Unstructured

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(c, r, bias=False) for r, c in _shapes(numel)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    params = prunable_parameters(model)
    with torch.no_grad():
        for p in params.values():
            local = p.to_local()
            start = rank * -(-p.shape[0] // world)
            for row in range(local.shape[0]):  # a function of the global index, row by row: no big temporary
                index = torch.arange((start + row) * COLS, (start + row + 1) * COLS, dtype=torch.float64)
                local[row].copy_(((index * 0.618).sin_() * 1024).round_() / 1024)
    # Warm-up on a tiny sharded model: kernels' code pages, the gloo buffers of an all-reduce of the histogram size.
    tiny = nn.Sequential(nn.Linear(64, 64, bias=False))
    fully_shard(tiny[0], mesh=mesh)
    fully_shard(tiny, mesh=mesh)
    Unstructured().prune_(mask_set_for(prunable_parameters(tiny)), MagnitudeImportance(), SPARSITY)
    dist.barrier()

    before, file_before = _maxrss_bytes(), _rss_file_bytes()
    with OtherLoad() as load:
        masks = mask_set_for(params)
        start_t = time.perf_counter()
        Unstructured().prune_(masks, MagnitudeImportance(), SPARSITY, "global")
        threshold_s = time.perf_counter() - start_t
    rise, file_rise = _maxrss_bytes() - before, _rss_file_bytes() - file_before
    owns: list[float] = [0.0] * world  # the ranks load each other: only processes outside the job count as others
    dist.all_gather_object(owns, load.own_s)
    local_bytes = sum(m.numel() * m.element_size() for m in masks.masks)
    for i, m in enumerate(masks.masks):  # bit-packed shards; COLS is a multiple of 8, so shards concatenate
        np.packbits(m.numpy().reshape(-1)).tofile(out / f"w{world}_r{rank}_t{i}.bits")
    result = {
        "world": world,
        "rank": rank,
        "rise_bytes": rise,
        "file_rise_bytes": file_rise,
        "mask_bytes": local_bytes,
        "local_weights": sum(m.numel() for m in masks.masks),
        "threshold_s": threshold_s,
        "other_load_cores": load.outside(sum(owns)),
        "pruned": masks.num_pruned(),
        "numel": masks.numel(),
    }
    dist.destroy_process_group()
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------- driver
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world: int, numel: int, out: Path) -> list[dict]:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(r), str(world), str(port), str(numel), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(world)
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            sys.stderr.write(stderr[-3000:])
            raise RuntimeError(f"a rank failed with exit code {proc.returncode}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def _same_masks(out: Path, numel: int, world: int) -> bool:
    for i in range(len(_shapes(numel))):
        whole = (out / f"w1_r0_t{i}.bits").read_bytes()
        parts = b"".join((out / f"w{world}_r{r}_t{i}.bits").read_bytes() for r in range(world))
        if whole != parts:
            return False
    return True


def _label(numel: int) -> str:
    return f"{numel / 1e6:.1f}M"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        rank, world, port, numel, out = sys.argv[2:7]
        _worker(int(rank), int(world), int(port), int(numel), Path(out))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4M weights only")
    parser.add_argument("--sizes", nargs="+", type=float, help="sizes in millions of weights, e.g. 50 200")
    parser.add_argument(
        "--max-other-load",
        type=float,
        default=0.25,
        help="cores other processes may use during a pruning step before its time is marked contended",
    )
    args = parser.parse_args()
    sizes_m = args.sizes or ([4] if args.quick else [50, 200])
    sizes = [math.ceil(s * 1e6 / (COLS * 8)) * COLS * 8 for s in sizes_m]
    rows = []
    busy = args.max_other_load
    for numel in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            runs = {world: _run(world, numel, out) for world in (1, 2)}
            same = _same_masks(out, numel, 2)
        expected = round(SPARSITY * numel)
        for world, results in runs.items():
            for r in results:
                rows.append(
                    [
                        _label(numel),
                        world,
                        r["rank"],
                        f"{r['local_weights'] / 1e6:.1f}M",
                        f"{r['mask_bytes'] / MB:.1f}",
                        f"{r['rise_bytes'] / MB:.1f}",
                        f"{r['file_rise_bytes'] / MB:.1f}",
                        f"{r['threshold_s']:.2f}" + (" (contended)" if r["other_load_cores"] > busy else ""),
                        f"{r['other_load_cores']:.2f}",
                        "yes" if r["pruned"] == expected else f"no ({r['pruned']} != {expected})",
                        "reference" if world == 1 else ("identical" if same else "DIFFERENT"),
                    ]
                )
    print(environment({"sparsity": SPARSITY, "layers": f"Linear({COLS}, {COLS}), bias-free, fully_shard each"}, 1))
    print(
        "Times are wall seconds of the pruning step, one core per rank; 'other load' counts the processes outside "
        f"the job (not its other rank), and a time during which they used more than {args.max_other_load} cores is "
        "marked contended: context, not a result. Memory and mask equality do not depend on load."
    )
    print(
        markdown_table(
            [
                "weights",
                "processes",
                "rank",
                "local weights",
                "mask MB",
                "peak rise MB (masks + threshold)",
                "file-backed RSS change MB",
                "threshold s",
                "other load, cores",
                "exact count",
                "masks vs 1 process",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
