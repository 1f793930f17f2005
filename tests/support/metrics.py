"""A server's /metrics: scraping it, reading one series, waiting for a counter to grow."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.support.server import HOST
from tests.support.waiting import wait_for


def scrape(port: int) -> str:
    """The text of http://127.0.0.1:`port`/metrics."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as answer:
        return answer.read().decode()


def value(text: str, name: str, **labels: str) -> float:
    """The sample `name` with these labels (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def wait_for_increase(port: int, before: str, name: str, message: str, **labels: str) -> None:
    """Wait until the metric `name{labels}` scraped from `port` is one more than in the `before` scrape."""
    wait_for(
        lambda: value(scrape(port), name, **labels) == 1 + value(before, name, **labels), message=message
    )
