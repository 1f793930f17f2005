"""Prometheus metrics of one server instance: names (importable by dashboards and tests), buckets, registry.

Each server owns a `CollectorRegistry`, so several servers can live in one process (tests) without their
series colliding. Units are base units (seconds), names follow Prometheus conventions with a `translator_`
prefix.

Model-quality signals:
- `translator_translation_mean_logprob`: log_prob / steps of every delivered translation (confidence; drifts
  down when inputs drift away from the training distribution).
- `translator_cross_attention_entropy_nats`: per translation, the mean over target steps of the entropy of the
  cross-attention row averaged over layers and heads. Observed for every translation whose attention was
  computed anyway (attention maps or replace_unknowns asked for) plus a sampled fraction of the other batches
  (`--quality-sample-rate`), which are run with attention outputs on just for this metric. High entropy means
  diffuse, unaligned attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Metric names as exposed on /metrics (prometheus-client adds `_total` to counters itself, so counters are
# registered with the suffix removed).
REQUEST_DURATION = "translator_request_duration_seconds"  # histogram {method, code}
REQUESTS = "translator_requests_total"  # counter {method, code}
QUEUE_WAIT = "translator_queue_wait_seconds"  # histogram: request arrival -> its batch starts
BATCH_SENTENCES = "translator_batch_size_sentences"  # histogram
BATCH_TOKENS = "translator_batch_size_tokens"  # histogram: padded source tokens (rows x longest)
COMPUTE_DURATION = "translator_compute_duration_seconds"  # histogram {stage="encode"|"decode"}, per batch
GENERATED_TOKENS = "translator_generated_tokens_total"  # counter: target tokens delivered ("</s>" included)
DROPPED_SENTENCES = "translator_dropped_sentences_total"  # counter {reason, stage="queued"|"decoding"}
INFLIGHT = "translator_inflight_requests"  # gauge: RPCs being handled
QUEUE_DEPTH = "translator_queue_depth_sentences"  # gauge: sentences waiting for a batch
MODEL_INFO = "translator_model_info"  # gauge = 1 {model, version, provider, precision}
MEAN_LOGPROB = "translator_translation_mean_logprob"  # histogram: log_prob / steps per translation
ATTENTION_ENTROPY = "translator_cross_attention_entropy_nats"  # histogram per translation
UNREAD_ANSWERS = "translator_unread_answers_total"  # counter {method, reason="slow_reader"|"client_gone"}
UNREAD_BYTES = "translator_unread_answer_bytes"  # gauge: answer bytes handed to gRPC, not yet taken
BEYOND_TRAINING = "translator_texts_beyond_training_total"  # counter {reason="longer"|"unknown_words"}

# The RPCs that run the model: what Triton's statistics call inference requests.
TRANSLATION_METHODS = ("Translate", "TranslateStream", "ModelInfer")

ALL_METRICS = (
    REQUEST_DURATION,
    REQUESTS,
    QUEUE_WAIT,
    BATCH_SENTENCES,
    BATCH_TOKENS,
    COMPUTE_DURATION,
    GENERATED_TOKENS,
    DROPPED_SENTENCES,
    INFLIGHT,
    QUEUE_DEPTH,
    MODEL_INFO,
    MEAN_LOGPROB,
    ATTENTION_ENTROPY,
    UNREAD_ANSWERS,
    UNREAD_BYTES,
    BEYOND_TRAINING,
)

STAGES = ("encode", "decode")

# Latency: 1 ms .. 10 s, roughly 1-2.5-5 per decade, enough resolution for p50/p99 on both ends.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Queue waits are usually below max_queue_delay (ms) but explode under overload.
QUEUE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# One encoder run of a tiny model takes ~0.1 ms; a long beam decode seconds.
COMPUTE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
SENTENCE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# Mean log-probabilities are <= 0: a confident model sits near 0, a confused one below -2.
LOGPROB_BUCKETS = (-10.0, -5.0, -3.0, -2.0, -1.5, -1.0, -0.75, -0.5, -0.25, -0.1, -0.05, -0.01, 0.0)
# Entropy of a distribution over S source tokens is at most ln S (ln 256 = 5.5 nats).
ENTROPY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0)


@dataclass(frozen=True)
class InferenceStatistics:
    """Counts and (count, nanoseconds) pairs, as Triton's ModelStatistics reports them."""

    last_inference_ms: int
    inference_count: int  # texts run in batches
    execution_count: int  # batches
    success: tuple[int, int]  # translation calls answered OK, time from arrival to answer
    fail: tuple[int, int]  # translation calls that failed
    queue: tuple[int, int]  # texts, time waited for a batch
    compute_infer: tuple[int, int]  # batches, engine time


def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


class ServerMetrics:
    """Every metric of one server, registered in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.last_inference_ms = 0  # when the last translation call was answered OK (Triton's statistics)
        r = self.registry
        self.request_duration = Histogram(
            REQUEST_DURATION,
            "Time to answer an RPC, by method and status code.",
            ["method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            REQUESTS.removesuffix("_total"),
            "RPCs answered, by method and status code.",
            ["method", "code"],
            registry=r,
        )
        self.queue_wait = Histogram(
            QUEUE_WAIT,
            "Time from a request's arrival to the start of the batch carrying each of its texts.",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.batch_sentences = Histogram(
            BATCH_SENTENCES, "Sentences per batch run by the engine.", buckets=SENTENCE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            BATCH_TOKENS,
            "Padded source tokens (sentences x longest) per batch.",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.compute_duration = Histogram(
            COMPUTE_DURATION,
            "Engine time per batch: encoder run(s) and decode loop (steps and cache reordering).",
            ["stage"],
            buckets=COMPUTE_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter(
            GENERATED_TOKENS.removesuffix("_total"),
            "Target tokens of delivered translations (</s> included).",
            registry=r,
        )
        self.dropped_sentences = Counter(
            DROPPED_SENTENCES.removesuffix("_total"),
            "Sentences given up before completion, by reason and where they were.",
            ["reason", "stage"],
            registry=r,
        )
        self.inflight = Gauge(INFLIGHT, "RPCs being handled right now.", registry=r)
        self.queue_depth = Gauge(QUEUE_DEPTH, "Sentences waiting for a batch.", registry=r)
        self.model_info = Gauge(
            MODEL_INFO,
            "The served model (value 1).",
            ["model", "version", "provider", "precision"],
            registry=r,
        )
        self.mean_logprob = Histogram(
            MEAN_LOGPROB,
            "Mean natural-log probability per target token of each translation.",
            buckets=LOGPROB_BUCKETS,
            registry=r,
        )
        self.attention_entropy = Histogram(
            ATTENTION_ENTROPY,
            "Mean entropy (nats) of the layer/head-averaged "
            "cross-attention rows of a translation; observed "
            "when attention was computed.",
            buckets=ENTROPY_BUCKETS,
            registry=r,
        )
        self.unread_answers = Counter(
            UNREAD_ANSWERS.removesuffix("_total"),
            "Streams ended before their answer was read: the client stopped reading for --write-timeout-s "
            "(slow_reader) or went away mid-answer (client_gone).",
            ["method", "reason"],
            registry=r,
        )
        self.unread_bytes = Gauge(
            UNREAD_BYTES,
            "Bytes of stream messages handed to gRPC that their clients have not taken yet.",
            registry=r,
        )
        self.beyond_training = Counter(
            BEYOND_TRAINING.removesuffix("_total"),
            "Texts asked for that the model was not trained for: longer than any training sentence (longer), "
            "or with words outside its vocabulary (unknown_words).",
            ["reason"],
            registry=r,
        )
        for reason in ("longer", "unknown_words"):
            self.beyond_training.labels(reason=reason)
        for stage in STAGES:  # series exist (at 0) before the first batch: dashboards and alerts see them
            self.compute_duration.labels(stage=stage)
        for method, reason in (("TranslateStream", "slow_reader"), ("TranslateStream", "client_gone"),
                               ("REST", "slow_reader")):  # likewise before the first unread answer
            self.unread_answers.labels(method=method, reason=reason)

    def observe_translation(self, log_prob: float, steps: int, cross_attention: np.ndarray | None) -> None:
        self.generated_tokens.inc(steps)
        if steps:
            self.mean_logprob.observe(log_prob / steps)
        if cross_attention is not None and cross_attention.size:
            self.attention_entropy.observe(cross_attention_entropy(cross_attention))

    def inference_statistics(self) -> InferenceStatistics:
        """Triton's cumulative statistics, read from the same series /metrics exposes."""
        totals: dict[tuple[str, bool], float] = {}  # (sample name, call succeeded) -> value
        for family in self.registry.collect():
            for sample in family.samples:
                method = sample.labels.get("method")
                if method is not None and method not in TRANSLATION_METHODS:
                    continue
                key = (sample.name, sample.labels.get("code", "OK") == "OK")
                totals[key] = totals.get(key, 0.0) + sample.value

        def total(name: str, succeeded: bool = True) -> float:
            return totals.get((name, succeeded), 0.0)

        return InferenceStatistics(
            last_inference_ms=self.last_inference_ms,
            inference_count=int(total(BATCH_SENTENCES + "_sum")),
            execution_count=int(total(BATCH_SENTENCES + "_count")),
            success=(int(total(REQUESTS)), _ns(total(REQUEST_DURATION + "_sum"))),
            fail=(int(total(REQUESTS, False)), _ns(total(REQUEST_DURATION + "_sum", False))),
            queue=(int(total(QUEUE_WAIT + "_count")), _ns(total(QUEUE_WAIT + "_sum"))),
            # Each batch observes one encode and one decode duration: a batch counts once.
            compute_infer=(int(total(BATCH_SENTENCES + "_count")), _ns(total(COMPUTE_DURATION + "_sum"))),
        )

    def answered(self, method: str, code: str, seconds: float) -> None:
        """One call answered with status `code` (its name) after `seconds`: its count and duration."""
        self.requests.labels(method=method, code=code).inc()
        self.request_duration.labels(method=method, code=code).observe(seconds)

    def drop(self, reason: str, stage: str, count: int = 1) -> None:
        if count:
            self.dropped_sentences.labels(reason=reason, stage=stage).inc(count)


def cross_attention_entropy(cross_attention: np.ndarray) -> float:
    """Mean over target steps of the entropy of the cross-attention row averaged over layers and heads.

    cross_attention [L, H, T, S]; rows are renormalised since the average of rows summing to 1 sums to 1 up to
    rounding only.
    """
    rows = cross_attention.astype(np.float64).mean(axis=(0, 1))  # [T, S]
    rows = rows / np.clip(rows.sum(axis=1, keepdims=True), 1e-12, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(rows > 0, -rows * np.log(rows), 0.0)
    return float(terms.sum(axis=1).mean())
