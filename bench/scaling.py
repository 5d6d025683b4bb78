"""Scaling on paper: what one training step costs per rank as the world grows.

No measurement here except the parameter count (the real model is built): the formulas below,
evaluated for a grid of world sizes and link speeds, one JSON line per row. The one measured
input is the compute time of a step at the chosen per-GPU batch (``--compute-ms``; default: the
H100 bf16 + channels_last figure for ResNet-18, batch 512, in docs/benchmarks.md).

Per rank, n views of b local samples, embedding dim d, gathered in float32 (the loss runs in
full precision), P model parameters, link bandwidth β bytes/s, per-hop latency α, W ranks:

- all-gather of the embeddings (forward): each rank receives (W-1)·n·b·d·4 bytes;
  the backward is a reduce-scatter of the same size (``gather_with_grad``).
  Ring time: (W-1)·n·b·d·4 / β + (W-1)·α, twice per step (forward + backward).
- DDP gradient all-reduce: 2·(W-1)/W · P·4 bytes (ring) — constant in W; it overlaps the
  backward in buckets, so this is the worst case.
- loss FLOPs: the three matmuls (logits, d/dq, d/dk) of n·b local anchors against n·W·b keys:
  6·n²·b²·W·d; plus ~3 passes over the n·b × n·W·b logits (max, exp, row sums: ~12 bytes per
  element) through memory.
- loss memory per rank: the float32 logits, n·b · n·W·b · 4 bytes (``loss.chunk_size=c``
  bounds it to n·b · c · 4).

    python bench/scaling.py                       # ResNet-18, b=512 per GPU, the default grid
    python bench/scaling.py --batch 256 --compute-ms 14.7
"""

from __future__ import annotations

import argparse
import json

from service.config import ModelConfig
from service.models import build_model

GIB = 1024**3


def model_parameters(arch: str, proj_hidden_dim: int, proj_out_dim: int) -> int:
    """Trainable parameters of the real backbone + projection head."""
    cfg = ModelConfig(arch=arch, proj_hidden_dim=proj_hidden_dim, proj_out_dim=proj_out_dim)
    return sum(p.numel() for p in build_model(cfg).parameters() if p.requires_grad)


def step_costs(
    world: int,
    gbps: float,
    *,
    batch: int,
    views: int,
    dim: int,
    params: int,
    compute_ms: float,
    latency_us: float,
    loss_tflops: float,
    mem_tbps: float,
) -> dict[str, float]:
    """The per-rank cost of one step at ``world`` ranks on ``gbps`` Gb/s links (see module doc)."""
    bandwidth = gbps * 1e9 / 8  # bytes/s
    gathered = (world - 1) * views * batch * dim * 4  # bytes received by one rank
    hops = (world - 1) * latency_us * 1e-6
    gather_ms = 2 * (gathered / bandwidth + hops) * 1e3  # forward gather + backward scatter
    allreduce_ms = 2 * (world - 1) / world * params * 4 / bandwidth * 1e3
    anchors, keys = views * batch, views * world * batch
    loss_flops = 6 * anchors * keys * dim
    loss_ms = (loss_flops / (loss_tflops * 1e12) + 12 * anchors * keys / (mem_tbps * 1e12)) * 1e3
    step_ms = compute_ms + loss_ms + gather_ms + allreduce_ms
    return {
        "world": world,
        "link_gbps": gbps,
        "gathered_mib_per_rank": round(gathered / 2**20, 2),
        "gather_ms": round(gather_ms, 2),
        "ddp_allreduce_ms": round(allreduce_ms, 2),
        "loss_gflop": round(loss_flops / 1e9, 1),
        "loss_ms": round(loss_ms, 2),
        "logits_gib_per_rank": round(anchors * keys * 4 / GIB, 3),
        "step_ms": round(step_ms, 1),
        "gather_share": round(gather_ms / step_ms, 3),
        "images_per_s_per_gpu": round(batch / step_ms * 1e3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--proj-hidden-dim", type=int, default=2048)
    p.add_argument("--dim", type=int, default=128, help="embedding (projection output) dim")
    p.add_argument("--batch", type=int, default=512, help="samples per GPU per step")
    p.add_argument("--views", type=int, default=2)
    p.add_argument(
        "--compute-ms",
        type=float,
        default=21.3,
        help="measured forward+backward+optimizer ms at --batch (no loss, no comms)",
    )
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 8, 64, 512])
    p.add_argument("--gbps", type=float, nargs="+", default=[100.0, 400.0])
    p.add_argument("--latency-us", type=float, default=5.0, help="per ring hop")
    p.add_argument("--loss-tflops", type=float, default=50.0, help="achieved fp32 matmul rate")
    p.add_argument("--mem-tbps", type=float, default=3.0, help="achieved memory bandwidth")
    args = p.parse_args()  # fmt: skip
    params = model_parameters(args.arch, args.proj_hidden_dim, args.dim)
    for gbps in args.gbps:
        for world in args.worlds:
            row = step_costs(
                world, gbps, batch=args.batch, views=args.views, dim=args.dim, params=params,
                compute_ms=args.compute_ms, latency_us=args.latency_us,
                loss_tflops=args.loss_tflops, mem_tbps=args.mem_tbps,
            )  # fmt: skip
            print(json.dumps({"arch": args.arch, "params": params, "batch_per_gpu": args.batch,
                              **row}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
