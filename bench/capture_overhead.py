"""Time a batched forward pass with router capture against the same forward without it.

Usage: python bench/capture_overhead.py MODEL_DIR DATA_PARQUET [--batch-size 64] [--repeats 7]
Prints the median time of each and their ratio. Both runs use the same inputs and threads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ramoe.data.schema import read_parallel
from ramoe.models.loading import load_model
from ramoe.routing.capture import RouterCapture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("data")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model({"kind": "local", "path": args.model_dir, "dtype": "float32"})
    prompts = [r["prompt"] for r in read_parallel(args.data).to_pylist() if r["lang"] == "en"][: args.batch_size]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)

    def forward() -> None:
        with torch.inference_mode():
            model(**batch, use_cache=False)

    def forward_with_capture() -> None:
        with RouterCapture(model) as capture, torch.inference_mode():
            model(**batch, use_cache=False)
            for layer in capture.logits:
                capture.top_k(layer)
                capture.probabilities(layer)

    timings: dict[str, list[float]] = {"plain": [], "capture": []}
    forward()
    forward_with_capture()  # warm-up
    for _ in range(args.repeats):
        for name, fn in (("plain", forward), ("capture", forward_with_capture)):
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    plain, capture = statistics.median(timings["plain"]), statistics.median(timings["capture"])
    print(f"tokens per batch: {int(batch['attention_mask'].sum())}, repeats: {args.repeats}, threads: {args.threads}")
    print(f"forward without capture: median {plain * 1e3:.1f} ms (min {min(timings['plain']) * 1e3:.1f}, max {max(timings['plain']) * 1e3:.1f})")
    print(f"forward with capture:    median {capture * 1e3:.1f} ms (min {min(timings['capture']) * 1e3:.1f}, max {max(timings['capture']) * 1e3:.1f})")
    print(f"ratio capture / plain: {capture / plain:.3f}")


if __name__ == "__main__":
    main()
