"""Train a small ``ats.torch.AttentionSampling`` model with ``DistributedDataParallel``.

Launch one process per device with ``torchrun``; two CPU processes on one
machine (gloo)::

    torchrun --standalone --nproc-per-node 2 -m examples.distributed.torch_ddp

On a machine with several GPUs, one process per GPU (NCCL)::

    torchrun --standalone --nproc-per-node 4 -m examples.distributed.torch_ddp --device cuda

Every rank seeds torch identically (``--torch-seed``: identical initial
weights, as DDP also enforces by broadcasting rank 0's), reads its own shard
of the data, and draws its own patches: ``ats.torch`` salts every sampling
key with the rank (``ats._distributed.salted_seed``), both the keys drawn
from torch's default generator (``--seed none``, the default) and a module's
own key stream (``--seed 1234``). Rank 0 draws exactly what a single-process
run draws. ``--record DIR`` writes what the tests compare (``rank<r>.pt``):
the patches each rank draws from one shared probe batch, and per step the
gradients after DDP's all-reduce and the parameters after the update.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

SIDE = 64  # x_high is SIDE x SIDE, x_low a quarter of that a side
PATCH = 8


def toy_data(n: int, seed: int = 0):
    """Noise images ``(n, 1, SIDE, SIDE)`` with one 8x8 block holding a 2-pixel bar; the label is the bar's
    orientation (0 horizontal, 1 vertical), which the 4x lower resolution view cannot show: only patches can."""
    gen = torch.Generator().manual_seed(seed)  # not torch's default generator: data leave the key stream alone
    x = torch.rand(n, 1, SIDE, SIDE, generator=gen) * 0.1
    labels = torch.randint(0, 2, (n,), generator=gen)
    for i in range(n):
        row, col = (int(v) * 4 for v in torch.randint(0, (SIDE - PATCH) // 4, (2,), generator=gen))
        block = x[i, 0, row:row + PATCH, col:col + PATCH]
        if labels[i]:
            block[:, 3:5] = 1.0
        else:
            block[3:5, :] = 1.0
    return x, labels


def low_view(x_high: torch.Tensor) -> torch.Tensor:
    return nn.functional.avg_pool2d(x_high, 4)


class Classifier(nn.Module):
    """Attention sampling over a 16x16 attention grid, 4 patches of 8x8, 8 features per patch, a linear head."""

    def __init__(self, seed=None):
        super().__init__()
        import ats.torch as at

        attention = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1),
                                  at.SampleSoftmax(squeeze_channels=True))
        feature = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.ats = at.AttentionSampling(attention, feature, patch_size=PATCH, n_patches=4, seed=seed)
        self.head = nn.Linear(8, 2)

    def forward(self, x_high):
        features, _, patches = self.ats(low_view(x_high), x_high)
        return self.head(features), patches


def build(seed=None, torch_seed: int = 0) -> Classifier:
    """The model with the initial weights every rank starts from (``torch.manual_seed(torch_seed)`` first)."""
    torch.manual_seed(torch_seed)
    return Classifier(seed)


def shard(x, y, rank: int, world: int, step: int, batch: int):
    """Rank ``rank``'s ``batch`` examples of step ``step``: the global batch ``world * batch`` split by rank."""
    start = (step * world + rank) * batch % len(x)
    index = torch.arange(start, start + batch) % len(x)
    return x[index], y[index]


def probe_batch():
    """One batch every rank sees identically (the tests compare the patches each rank draws from it)."""
    return toy_data(2, seed=99)[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4, help="examples per rank and step")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--lr", type=float, default=0.03, help="learning rate")
    parser.add_argument("--seed", default="none",
                        help="'none' (keys from torch's default generator) or an int: the modules' sampling seed")
    parser.add_argument("--torch-seed", type=int, default=0, help="torch.manual_seed on every rank")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    parser.add_argument("--record", type=Path, default=None, help="write rank<r>.pt here")
    args = parser.parse_args(argv)
    seed = None if args.seed.lower() == "none" else int(args.seed)

    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        model = build(seed, args.torch_seed).to(device)
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = (torch.optim.Adam if args.optimizer == "adam" else torch.optim.SGD)(ddp.parameters(), lr=args.lr)
        x, y = toy_data(64)
        record = {"rank": rank, "world": world, "grads": [], "params": [], "loss": []}
        with torch.no_grad():  # the first key of the stream: the same probe image on every rank
            record["probe_patches"] = ddp(probe_batch().to(device))[1].cpu()
        for step in range(args.steps):
            xb, yb = shard(x, y, rank, world, step, args.batch)
            logits, _ = ddp(xb.to(device))
            loss = nn.functional.cross_entropy(logits, yb.to(device))
            optimizer.zero_grad()
            loss.backward()  # DDP all-reduces (averages) the gradients here
            optimizer.step()
            record["loss"].append(float(loss.detach()))
            if args.record is not None:
                record["grads"].append([p.grad.detach().cpu().clone() for p in model.parameters()])
                record["params"].append([p.detach().cpu().clone() for p in model.parameters()])
        losses = torch.tensor(record["loss"])
        dist.all_reduce(losses)
        if rank == 0:
            tail = max(1, len(losses) // 5)
            print(json.dumps({"world": world, "steps": args.steps, "first_loss": float(losses[:tail].mean()) / world,
                              "last_loss": float(losses[-tail:].mean()) / world}), flush=True)
        if args.record is not None:
            args.record.mkdir(parents=True, exist_ok=True)
            torch.save(record, args.record / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
