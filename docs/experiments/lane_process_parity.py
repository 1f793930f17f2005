"""A lane-process engine against the in-process one: same tokens, scores and attention maps; speed of each.

    .venv/bin/python docs/experiments/lane_process_parity.py [cpu|cuda]

256 test sentences, greedy, without and with every attention map; then five passes at batch 64 each way
(the lane process's answers cross a socket: its in-process speed is lower, its gain is in the server, where
its search no longer shares the interpreter lock with gRPC).
"""

from __future__ import annotations

import sys
import time

import numpy as np

from model.data import toy_split
from service.core.options import ATTENTION_KINDS, TranslateOptions
from service.engine.engine import Engine

MAPS = ("cross_attention", "decoder_self_attention", "encoder_attention")


def main() -> None:
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    texts = [example.source for example in toy_split("test", 256)]
    plain = Engine.load("model_repository", "toy-en-es", device=device)
    lanes = Engine.load("model_repository", "toy-en-es", device=device, lane_processes=True)
    assert lanes.lane_processes is not None
    print("providers:", plain.provider, lanes.provider, "lane pids:", lanes.lane_processes.pids)
    for options in (TranslateOptions(), TranslateOptions(attention=frozenset(ATTENTION_KINDS))):
        ours, theirs = plain.translate(texts, options), lanes.translate(texts, options)
        pairs = list(zip(ours, theirs, strict=True))
        same = sum(a.text == b.text and abs(a.score - b.score) < 1e-5 for a, b in pairs)
        difference = 0.0
        if options.attention:
            difference = max(
                float(np.abs(getattr(a, name) - getattr(b, name)).max())
                for a, b in pairs
                for name in MAPS
            )
        print(f"attention={sorted(options.attention)}: {same} of {len(ours)} equal, "
              f"max map difference {difference:.2e}")
    for name, engine in (("in-process", plain), ("lane process", lanes)):
        engine.translate(texts[:64])
        start = time.perf_counter()
        for _ in range(5):
            engine.translate(texts, batch_size=64)
        print(f"{name}: {5 * len(texts) / (time.perf_counter() - start):.1f} sentences/s at batch 64")
    lanes.close()
    plain.close()


if __name__ == "__main__":
    main()
