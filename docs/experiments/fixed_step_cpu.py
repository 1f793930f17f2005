"""What the fixed-shape step (decoder_fixed.onnx) costs on the CPU against the dynamic step.

    .venv/bin/python docs/experiments/fixed_step_cpu.py [--threads 2] [--rounds 3]

The shipped model, one in-process lane per engine, greedy, no maps: 512 `test` sentences (and the first 128
`long` ones) translated in batches of 1, 8, 32 and 128 by `Engine.load(step_graph=...)` for both steps, the
two interleaved round by round; medians of the rounds, and the tokens of the two compared.
"""

from __future__ import annotations

import argparse
import statistics
import time

from model.data import toy_split
from service.core.options import TranslateOptions
from service.engine.engine import Engine

REPOSITORY, MODEL = "model_repository", "toy-en-es"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    engines = {
        step: Engine.load(REPOSITORY, MODEL, device="cpu", threads=args.threads, lanes=1, step_graph=step)
        for step in ("dynamic", "fixed")
    }
    options = TranslateOptions()
    for split, count, sizes in (("test", 512, (1, 8, 32, 128)), ("long", 128, (32,))):
        texts = [example.source for example in toy_split(split, count)]
        for size in sizes:
            seconds: dict[str, list[float]] = {step: [] for step in engines}
            tokens = {}
            for _ in range(args.rounds):
                for step, engine in engines.items():
                    started = time.perf_counter()
                    translations = engine.translate(texts, options, batch_size=size)
                    seconds[step].append(time.perf_counter() - started)
                    tokens[step] = [t.token_ids for t in translations]
            dynamic, fixed = (statistics.median(seconds[step]) for step in engines)
            same = sum(a == b for a, b in zip(tokens["dynamic"], tokens["fixed"], strict=True))
            print(f"{split} batch {size:>3}: dynamic {count / dynamic:7.1f} sentences/s, fixed "
                  f"{count / fixed:7.1f} ({dynamic / fixed:.2f}x); same tokens {same}/{count}", flush=True)


if __name__ == "__main__":
    main()
