"""The FSDP2 sharded save/restore check of bench/gpu_throughput.py (`--fsdp-check`, issue 9).

A small model (the config values it is given) sharded with `fully_shard` per decoder layer and whole, over one
rank per visible GPU (NCCL, spawned) or two CPU ranks (gloo, forked): two optimizer steps, a sharded save of
model and optimizer state with torch.distributed.checkpoint, a third step; then a restore into a fresh model
with other initial weights, whose third step must be the same (loss equal, weights bitwise equal). Each rank
writes its figures as JSON in a temporary folder; `fsdp2_check` gathers them.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_rank(rank: int, world: int, backend: str, port: int, workdir: str, values: dict[str, Any]) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "gloo":
        torch.set_num_threads(1)  # two CPU ranks on a small machine
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))
    values = dict(values)
    config = AutoConfig.for_model(values.pop("model_type"), **values)

    def build(seed: int) -> tuple[Any, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, config.vocab_size, (2, 32), generator=gen).to(device) for _ in range(3)]

    def step(model: Any, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return float(loss.detach())

    model, optimizer = build(0)
    for ids in batches[:2]:
        step(model, optimizer, ids)
    msd, osd = get_state_dict(model, optimizer)
    ckpt = os.path.join(workdir, "ckpt")
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    loss_a = step(model, optimizer, batches[2])
    restored, restored_opt = build(123)  # other initial weights: a no-op restore would show
    msd2, osd2 = get_state_dict(restored, restored_opt)
    dcp.load({"model": msd2, "optim": osd2}, checkpoint_id=ckpt)
    set_state_dict(restored, restored_opt, model_state_dict=msd2, optim_state_dict=osd2)
    loss_b = step(restored, restored_opt, batches[2])
    first = next(model.parameters())
    with torch.no_grad():
        diff = max(
            float((p.full_tensor() - q.full_tensor()).abs().max())
            for p, q in zip(model.parameters(), restored.parameters(), strict=True)
        )
    result = {
        "rank": rank,
        "loss_after_save": loss_a,
        "loss_after_restore": loss_b,
        "max_abs_weight_diff": diff,
        "param_type": type(first).__name__,
        "placements": [str(pl) for pl in getattr(first, "placements", ())],
        "local_shard_numel": first.to_local().numel() if hasattr(first, "to_local") else first.numel(),
        "full_numel": first.numel(),
    }
    Path(workdir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def fsdp2_check(device: torch.device, values: dict[str, Any]) -> dict[str, Any]:
    """Sharded FSDP2 save (torch.distributed.checkpoint) and restore into a fresh model of config `values`;
    next step identical."""
    import torch.multiprocessing as mp

    if device.type == "cuda":
        world, backend, method = torch.cuda.device_count(), "nccl", "spawn"  # CUDA cannot fork once initialised
    else:
        world, backend, method = 2, "gloo", "fork"  # fork: the children reuse this process's imports
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        try:
            mp.start_processes(
                _fsdp_rank, args=(world, backend, _free_port(), workdir, values), nprocs=world, start_method=method
            )
        except Exception as exc:
            return {"status": f"error: {type(exc).__name__}: {exc}"[:1000], "world_size": world, "backend": backend}
        ranks = [json.loads(Path(workdir, f"rank{r}.json").read_text()) for r in range(world)]
        files = sorted(os.listdir(Path(workdir, "ckpt")))
    same = all(r["loss_after_save"] == r["loss_after_restore"] and r["max_abs_weight_diff"] == 0.0 for r in ranks)
    sharded = all(r["param_type"] == "DTensor" for r in ranks)
    return {
        "status": "ok" if same and sharded else "mismatch",
        "world_size": world,
        "backend": backend,
        "sharded_files": files,
        "identical_next_step": same,
        "ranks": ranks,
        "seconds": round(time.perf_counter() - started, 1),
    }
