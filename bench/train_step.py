"""Throughput of the training loop's own step (``service.train.train_step``: 2 views → encoder +
head → NT-Xent → AdamW step → LR schedule).

Prints one JSON line per configuration: images/s (source images, 2 views each) and peak memory.
Runs on CUDA when available (bf16 autocast + channels_last, as the training loop picks there),
else CPU. Synthetic inputs: this isolates model + loss cost from decoding/augmentation, which
bench/data.py measures.

    python bench/train_step.py --arch resnet18 --batch 256 512 --steps 20
    # CPU recipe costs: view size x small-CNN width x memory layout, one thread
    python bench/train_step.py --arch small_cnn --batch 256 --size 32 24 16 --width 32 48 64 \
        --proj-hidden 512 --chunk none --threads 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from service.config import Config, LossConfig, ModelConfig, TrainConfig
from service.train import build_state, train_step


def measure(
    arch: str,
    batch: int,
    amp: str,
    channels_last: bool,
    chunk: int | None,
    steps: int,
    device: torch.device,
    size: int = 32,
    width: int = 32,
    proj_hidden: int = 2048,
    depth: int = 1,
) -> dict:
    torch.manual_seed(0)
    config = Config(
        model=ModelConfig(
            arch=arch, proj_hidden_dim=proj_hidden, channels_last=channels_last,
            width=width if arch == "small_cnn" else ModelConfig.width,
            depth=depth if arch == "small_cnn" else ModelConfig.depth,
        ),
        loss=LossConfig(temperature=0.2, chunk_size=chunk),
        train=TrainConfig(
            global_batch_size=batch, num_workers=1, optimizer="adamw", lr=1e-3,
            lr_scaling="none", amp=amp, epochs=1,
        ),
    )  # fmt: skip
    state = build_state(config, device, steps_per_epoch=steps + 3, gather_distributed=False)
    views = list(torch.randn(2 * batch, 3, size, size, device=device).chunk(2))

    for _ in range(3):
        train_step(state, views)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = train_step(state, views)  # the training loop's own step (it syncs on the loss)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "arch": arch,
        "width": width if arch == "small_cnn" else None,
        "depth": depth if arch == "small_cnn" else None,
        "size": size,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "batch": batch,
        "amp": amp,
        "channels_last": channels_last,
        "chunk_size": chunk,
        "step_s": seconds / steps,
        "images_per_s": batch * steps / seconds,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else None,
        "loss": loss,
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, nargs="+", default=[32], help="view side (px)")
    parser.add_argument("--width", type=int, nargs="+", default=[32], help="small_cnn width")
    parser.add_argument("--depth", type=int, nargs="+", default=[1], help="small_cnn depth")
    parser.add_argument("--proj-hidden", type=int, default=2048)
    parser.add_argument("--chunk", nargs="+", default=["none", "1024"], help="loss chunk_size")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    # GPU: fp32 vs bf16 + channels_last (the loop's pairing); CPU: the two memory layouts
    modes = (
        [("off", False), ("bf16", True)]
        if device.type == "cuda"
        else [("off", False), ("off", True)]
    )
    chunks = [None if c == "none" else int(c) for c in args.chunk]
    shapes = itertools.product(args.batch, args.size, args.width, args.depth)
    for batch, size, width, depth in shapes:
        for (amp, channels_last), chunk in itertools.product(modes, chunks):
            row = measure(
                args.arch, batch, amp, channels_last, chunk, args.steps, device,
                size=size, width=width, proj_hidden=args.proj_hidden, depth=depth,
            )  # fmt: skip
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
