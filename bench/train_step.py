"""Throughput of the training loop's own step (``service.train.train_step``: 2 views → encoder +
head → NT-Xent → AdamW step → LR schedule).

Prints one JSON line per configuration: images/s (source images, 2 views each) and peak memory.
Runs on CUDA when available (bf16 autocast + channels_last, as the training loop picks there),
else CPU. Synthetic inputs: this isolates model + loss cost from decoding/augmentation, which
bench/data.py measures.

    python bench/train_step.py --arch resnet18 --batch 256 512 --steps 20
"""

from __future__ import annotations

import argparse
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
) -> dict:
    torch.manual_seed(0)
    config = Config(
        model=ModelConfig(arch=arch, proj_hidden_dim=2048, channels_last=channels_last),
        loss=LossConfig(temperature=0.2, chunk_size=chunk),
        train=TrainConfig(
            global_batch_size=batch, num_workers=1, optimizer="adamw", lr=1e-3,
            lr_scaling="none", amp=amp, epochs=1,
        ),
    )  # fmt: skip
    state = build_state(config, device, steps_per_epoch=steps + 3, gather_distributed=False)
    size = 32
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
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    modes = [("off", False), ("bf16", True)] if device.type == "cuda" else [("off", False)]
    for batch in args.batch:
        for amp, channels_last in modes:
            for chunk in (None, 1024):
                print(
                    json.dumps(
                        measure(args.arch, batch, amp, channels_last, chunk, args.steps, device)
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
