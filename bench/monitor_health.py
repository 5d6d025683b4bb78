"""What representation health adds to the image–text validation monitor per monitored epoch.

The ``ImageTextMonitor``'s metrics (``service.eval.image_text.image_text_metrics``) on the
config's validation rows, with ``health`` off and on, interleaved (the order alternating) so that
both see the same machine load; the model is the config's at a seeded random init (the cost does
not depend on the weights). Also the health math alone (``image_text_health`` on the embeddings
the monitor already has), which is what ``health=True`` adds besides keeping the backbone
features. One JSON line per mode (median and min seconds, ``cpu_s``: median CPU seconds), then a
summary with the extra seconds and the load average before and after.

    python bench/monitor_health.py --config jobs/configs/clip-smoke-cpu.yaml --repeats 5
    python bench/monitor_health.py --set data.val_fraction=0.4  # the 2,000-row monitor cap
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from service.config import load_config
from service.eval.health import image_text_health
from service.eval.image_text import ImageTextMonitor, image_text_metrics, run_tokenizer
from service.eval.retrieval import caption_groups
from service.models import build_training_model


def _timed(f) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    f()
    return time.perf_counter() - wall, time.process_time() - cpu


def _summary(name: str, times: list[tuple[float, float]]) -> dict:
    walls, cpus = [w for w, _ in times], [c for _, c in times]
    return {
        "mode": name, "step_s": statistics.median(walls), "min_s": min(walls),
        "cpu_s": statistics.median(cpus), "repeats": len(times),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="jobs/configs/clip-smoke-cpu.yaml")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    config = load_config(args.config, args.set)
    torch.manual_seed(config.train.seed)
    model = build_training_model(config)
    monitor = ImageTextMonitor(config, run_tokenizer(config))
    data = monitor.data()  # read once, as the monitor does

    def metrics(health: bool) -> dict[str, float]:
        return image_text_metrics(model, monitor.tokenizer, data, config, "cpu", health=health)

    metrics(True)  # warm-up (allocator, first-call imports)
    times: dict[str, list] = {"health_off": [], "health_on": []}
    for r in range(args.repeats):
        for mode in ("health_off", "health_on")[:: 1 if r % 2 == 0 else -1]:
            times[mode].append(_timed(lambda m=mode: metrics(m == "health_on")))
    # the health math alone, on the same embeddings the monitor computed
    model.eval()
    with torch.no_grad():
        from service.data.augment import eval_transform
        from service.data.decode import decode_image

        c = config
        transform = eval_transform(c.data.image_size, c.augment.mean, c.augment.std)
        x = torch.stack([transform(decode_image(b)) for b in data.images])
        features = model.embed(x)
        images = torch.nn.functional.normalize(model.head(features), dim=1)
        ids, distinct = caption_groups(data.captions)
        tokens = monitor.tokenizer.encode(distinct, c.text.context_length)
        texts = model.encode_text(tokens)
    math_times = [_timed(lambda: image_text_health(features, images, texts, ids))
                  for _ in range(args.repeats)]  # fmt: skip
    rows = [_summary(k, v) for k, v in times.items()] + [_summary("health_math", math_times)]
    for row in rows:
        row.update(rows=len(data), distinct_captions=len(distinct), threads=args.threads)
        print(json.dumps(row))
    off, on = rows[0], rows[1]
    print(json.dumps({
        "summary": "image-text monitor + health", "config": args.config, "set": args.set,
        "extra_s": on["step_s"] - off["step_s"], "extra_min_s": on["min_s"] - off["min_s"],
        "extra_cpu_s": on["cpu_s"] - off["cpu_s"], "health_math_s": rows[2]["step_s"],
        "monitor_s": off["step_s"], "load_before": load_before, "load_after": os.getloadavg(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
