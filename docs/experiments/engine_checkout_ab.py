"""The engine's in-process throughput in one checkout, for an A/B against another checkout.

Run it alternately with PYTHONPATH pointing at each checkout (its `service` package is the one imported; the
model and sentences come from this repository):

    for i in 1 2 3; do
        PYTHONPATH=/path/to/other/checkout .venv/bin/python docs/experiments/engine_checkout_ab.py before
        PYTHONPATH=. .venv/bin/python docs/experiments/engine_checkout_ab.py after
    done

Prints one JSON line: sentences/s of `Engine.search_ids` (greedy, 2 threads: two lane threads) on 512 test
sentences at batch sizes 8, 32 and 128, each the median of 3 passes of at least 2 s.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

try:  # the layered code
    from service.core.options import TranslateOptions
    from service.engine.engine import Engine
except ImportError:  # the code before the layers, where the engine was one module
    from service.engine import Engine, TranslateOptions  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[2]
SENTENCES = ROOT / "bench" / "data" / "test_sentences.txt"
BATCH_SIZES = (8, 32, 128)


def main(label: str) -> None:
    texts = [line.strip() for line in SENTENCES.read_text().splitlines() if line.strip()][:512]
    engine = Engine.load(ROOT / "model_repository", "toy-en-es", device="cpu", threads=2)
    sources = [source.ids for source in engine.encode_texts(texts)]
    options = TranslateOptions()
    engine.search_ids(sources[:64], options)  # warm-up
    result: dict[str, object] = {"label": label, "module": Engine.__module__}
    for size in BATCH_SIZES:
        rates = []
        for _ in range(3):
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < 2.0:
                for i in range(0, len(sources), size):
                    engine.search_ids(sources[i:i + size], options)
                done += len(sources)
            rates.append(done / (time.perf_counter() - start))
        result[str(size)] = round(statistics.median(rates), 1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "this checkout")
