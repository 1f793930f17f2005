"""The server's settings: flags, TRANSLATOR_* variables, defaults and bounds."""

from __future__ import annotations

import pytest

from service.server.config import ROOT, build_parser, env_name, load_config


def test_settings_from_flags_environment_and_defaults() -> None:
    defaults = load_config([], environ={})
    assert (defaults.host, defaults.port, defaults.metrics_port) == ("0.0.0.0", 8001, 8002)
    assert (defaults.model_repository, defaults.model, defaults.model_version) == (
        ROOT / "model_repository",
        "toy-en-es",
        None,
    )
    assert (
        defaults.max_batch_size,
        defaults.max_batch_tokens,
        defaults.max_queue_delay_ms,
        defaults.max_queue_size,
        defaults.grace_period_s,
    ) == (64, 4096, 5.0, 1024, 30.0)
    # What the server accepts and what it sends are limited apart; translation calls and threads too.
    assert (defaults.max_receive_message_bytes, defaults.max_message_bytes) == (4 * 1024**2, 64 * 1024**2)
    calls = (defaults.max_concurrent_rpcs, defaults.grpc_max_calls, defaults.grpc_call_limit)
    assert calls == (256, None, 512)
    environ = {env_name("port"): "7000", env_name("max_batch_size"): "8", env_name("tls_cert"): ""}
    environ[env_name("max_receive_message_bytes")] = "1000"
    config = load_config(["--port", "9000", "--model-version", "3"], environ=environ)
    assert (config.port, config.max_batch_size, config.model_version, config.tls_cert) == (9000, 8, 3, None)
    assert config.max_receive_message_bytes == 1000
    config = load_config(["--max-concurrent-rpcs", "4", "--grpc-max-calls", "5"], environ={})
    assert config.grpc_call_limit == 5
    assert defaults.precision == "float32"
    assert load_config([], environ={env_name("precision"): "int8"}).precision == "int8"
    assert (defaults.step_graph, load_config(["--step-graph", "fixed"], environ={}).step_graph) == (
        "dynamic", "fixed"
    )
    for argv, environ in (
        ([], {env_name("port"): "eighty"}),
        (["--max-batch-size", "0"], {}),
        (["--tls-cert", "x.pem"], {}),
        (["--max-texts-per-request", "2000"], {}),
        (["--precision", "bfloat16"], {}),
        (["--step-graph", "static"], {}),
    ):
        with pytest.raises(SystemExit):
            load_config(argv, environ=environ)
    help_text = " ".join(build_parser().format_help().split())
    for name in (
        "TRANSLATOR_PORT",
        "TRANSLATOR_MAX_QUEUE_DELAY_MS",
        "TRANSLATOR_GRACE_PERIOD_S",
        "TRANSLATOR_MAX_RECEIVE_MESSAGE_BYTES",
        "TRANSLATOR_MAX_CONCURRENT_RPCS",
    ):
        assert name in help_text
    assert "(default: 8001; env TRANSLATOR_PORT)" in help_text
    assert "largest gRPC message the server sends" in help_text
    assert "rpcs + 256; env TRANSLATOR_GRPC_MAX_CALLS)" in help_text  # argparse may wrap at hyphens


@pytest.mark.parametrize(
    "argv, environ, message",
    [
        # 1e13 ms overflowed the batcher's timed wait (OverflowError in the worker, retried forever).
        (["--max-queue-delay-ms", "1e13"], {}, "--max-queue-delay-ms must be between 0 and 60000"),
        ([], {"TRANSLATOR_MAX_QUEUE_DELAY_MS": "inf"}, "--max-queue-delay-ms must be between 0 and 60000"),
        (["--grace-period-s", "1e300"], {}, "--grace-period-s must be between 0 and 86400"),
        (["--max-receive-message-bytes", "3000000000"], {}, "--max-receive-message-bytes must be between 1"),
        (["--max-message-bytes", "0"], {}, "--max-message-bytes must be between 1"),
        (["--max-length-limit", "5000"], {}, "--max-length-limit must be between 1 and 1000"),
        (["--max-batch-tokens", "-1"], {}, "--max-batch-tokens must be between 0"),
        (["--threads", "0"], {}, "--threads must be between 1"),
        (["--model-version", "-2"], {}, "--model-version must be between 0"),
        (["--quality-sample-rate", "nan"], {}, "--quality-sample-rate must be between 0 and 1"),
        (["--grpc-max-calls", "8"], {}, "--grpc-max-calls must exceed --max-concurrent-rpcs (256)"),
    ],
)
def test_every_numeric_setting_is_bounded(
    argv: list[str], environ: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        load_config(argv, environ=environ)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
