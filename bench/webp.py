"""What the worker's WebP encoding costs, by Pillow's effort setting ("method", 0-6).

The worker encodes each image on the CPU while the next job generates, so this time is both CPU a
job costs and time the encoder competes with the generation for the GIL (``bench/gpu_worker.py``
measures that contention on a GPU). Images: smooth multi-scale noise ("plasma", like a generated
picture's mix of large shapes and detail) at 512 and 1024 px, and blurred noise (hard to compress).

    python bench/webp.py --runs 5 --json /tmp/webp.json
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

QUALITY = 90  # the worker's (consumers.pipelines.WEBP_QUALITY)


def plasma(size: int, seed: int = 0) -> Image.Image:
    """Noise summed over scales, each octave weaker: smooth areas, edges and fine detail."""
    rng = np.random.default_rng(seed)
    total = np.zeros((size, size, 3))
    for cells in (4, 8, 16, 32, 64, 128):
        octave = Image.fromarray((rng.random((cells, cells, 3)) * 255).astype(np.uint8)).resize((size, size),
                                                                                             Image.BICUBIC)
        total += np.asarray(octave, dtype=float) * (cells / 128) ** 0.5
    total = (total - total.min()) / (total.max() - total.min()) * 255
    return Image.fromarray(total.astype(np.uint8))


def encode(image: Image.Image, method: int) -> bytes:
    out = io.BytesIO()
    image.save(out, format="WEBP", quality=QUALITY, method=method)
    return out.getvalue()


def psnr(image: Image.Image, data: bytes) -> float:
    """Fidelity of the decoded WebP to the original, in dB (higher is closer)."""
    original = np.asarray(image, dtype=float)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=float)
    return float(10 * np.log10(255**2 / np.mean((original - decoded) ** 2)))


def measure(image: Image.Image, method: int, runs: int) -> dict[str, float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        data = encode(image, method)
        times.append(time.perf_counter() - started)
    return {"ms_median": round(1000 * statistics.median(times), 1), "kib": round(len(data) / 1024, 1),
            "psnr_db": round(psnr(image, data), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="encodes per image and method (default 5)")
    parser.add_argument("--methods", type=int, nargs="+", default=[0, 2, 4, 6], help="efforts to try (default 0 2 4 6)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    noise = Image.effect_noise((512, 512), 80).convert("RGB").filter(ImageFilter.GaussianBlur(1))
    images = {"plasma 512": plasma(512), "plasma 1024": plasma(1024), "blurred noise 512": noise}
    results = {name: {m: measure(image, m, args.runs) for m in args.methods} for name, image in images.items()}
    for name, by_method in results.items():
        print(name + ": " + ", ".join(f"method {m} {r['ms_median']} ms {r['kib']} KiB {r['psnr_db']} dB"
                                      for m, r in by_method.items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
