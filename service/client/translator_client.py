"""A client for the translator's gRPC API: `TranslatorClient` for programs, `translator-client` for people.

    with TranslatorClient("localhost:8001") as client:
        [result] = client.translate(["the big dog sees the cat"], attention=["cross"])
        result.text, result.attention["cross"].weights.shape   # [layers, heads, target, source]

The CLI translates its arguments, or one text per line of stdin when none are given:

    translator-client "the dog sees the cat" --beam-size 4 --attention maps.png --html view.html
    cat sentences.txt | translator-client --json

gRPC failures surface as `TranslatorError` (its `code` is the grpc.StatusCode); the CLI turns them into one
line, "error: <CODE>: <message>", and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
import numpy as np

from service.api.kinds import KIND_ENUMS, KIND_NAMES
from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc
from service.client.attention_html import write_attention_html
from service.core.cli import input_file, output_file, positive_float, server_address

DEFAULT_SERVER = "localhost:8001"
SERVER_ENV = "TRANSLATOR_SERVER"
TOKEN_ENV = "TRANSLATOR_TOKEN"

# Names used by the engine (service.core.options.ATTENTION_KINDS) mapped to the wire enum.
ATTENTION_KINDS = KIND_ENUMS

# Attention maps grow with texts x kinds x layers x heads x rows x cols; gRPC's 4 MiB default is too small
# for a batch of long sentences with every map, so the client accepts what a server may reasonably send.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class TranslatorError(Exception):
    """A failed call: `code` is the gRPC status code, `message` the server's (or gRPC's) explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        # One line, because the CLI prints it as one and logs are easier to grep.
        self.code = code
        self.message = " ".join(message.split())
        super().__init__(f"{code.name}: {self.message}")


class ServerUnavailableError(TranslatorError):
    """The server could not be reached (nothing listening, wrong address, TLS mismatch, shutting down)."""


@dataclass
class AttentionMap:
    """One kind of attention for one translation (see AttentionMap in translator.proto)."""

    kind: str  # "cross", "decoder_self" or "encoder_self"
    weights: np.ndarray  # float32 [layers, heads, rows, cols]
    row_tokens: list[str]  # queries: target tokens (cross, decoder_self) or source tokens (encoder_self)
    column_tokens: list[str]  # keys: source tokens (cross, encoder_self), "<s>" + target[:-1] (decoder_self)
    layers: list[int]  # model layer index of each entry of the first dimension
    heads: list[int]  # model head index of each entry of the second dimension

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "layers": self.layers, "heads": self.heads, "row_tokens": self.row_tokens,
                "column_tokens": self.column_tokens, "shape": list(self.weights.shape),
                "weights": np.round(self.weights.astype(np.float64), 5).tolist()}


@dataclass
class ClientTranslation:
    """The translation of one text, with numpy attention maps keyed by kind."""

    text: str
    source_tokens: list[str]
    target_tokens: list[str]
    score: float
    log_prob: float
    unknown_words: list[str]
    timings: dict[str, float]  # queue_ms, compute_ms, total_ms
    attention: dict[str, AttentionMap] = field(default_factory=dict)
    source: str = ""  # the text that was sent, for display

    def to_dict(self, include_attention: bool = False) -> dict[str, Any]:
        """A JSON-ready dict; the (large) maps only when asked for."""
        result: dict[str, Any] = {
            "source": self.source, "translation": self.text, "source_tokens": self.source_tokens,
            "target_tokens": self.target_tokens, "score": self.score, "log_prob": self.log_prob,
            "unknown_words": self.unknown_words, "timings": self.timings,
        }
        if include_attention:
            result["attention"] = {kind: m.to_dict() for kind, m in self.attention.items()}
        return result


@dataclass
class ModelInfo:
    """What GetModelInfo says about the served model and the server's settings."""

    name: str
    version: str
    architecture: dict[str, int]
    source_vocab_size: int
    target_vocab_size: int
    execution_provider: str
    batching: dict[str, float]
    precision: str
    limits: dict[str, int]
    training_metrics: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _fields(message: Any) -> dict[str, Any]:
    """Every scalar field of a flat message, defaults included (MessageToDict would drop zeros)."""
    return {f.name: getattr(message, f.name) for f in message.DESCRIPTOR.fields}


def _tensor(tensor: pb.Tensor) -> np.ndarray:
    shape = tuple(int(d) for d in tensor.shape)
    data = np.asarray(tensor.data, dtype=np.float32)
    if data.size != int(np.prod(shape, dtype=np.int64)):
        raise TranslatorError(grpc.StatusCode.INTERNAL,
                              f"malformed attention tensor: shape {list(shape)} but {data.size} values")
    return data.reshape(shape)


def _translation(message: pb.Translation, source: str = "") -> ClientTranslation:
    maps = {}
    for entry in message.attention:
        kind = KIND_NAMES.get(entry.kind, f"kind_{entry.kind}")
        maps[kind] = AttentionMap(kind=kind, weights=_tensor(entry.weights),
                                  row_tokens=list(entry.row_tokens), column_tokens=list(entry.column_tokens),
                                  layers=list(entry.layers), heads=list(entry.heads))
    return ClientTranslation(
        text=message.text, source_tokens=list(message.source_tokens),
        target_tokens=list(message.target_tokens), score=float(message.score),
        log_prob=float(message.log_prob), unknown_words=list(message.unknown_words),
        timings={"queue_ms": message.timings.queue_ms, "compute_ms": message.timings.compute_ms,
                 "total_ms": message.timings.total_ms},
        attention=maps, source=source)


def _options(beam_size: int | None, max_length: int | None, length_penalty: float | None,
             replace_unknowns: bool, attention: Iterable[str | int], layers: Iterable[int],
             heads: Iterable[int]) -> pb.TranslateOptions:
    options = pb.TranslateOptions(replace_unknowns=replace_unknowns)
    # Only set what the caller set: an unset optional field means "server default", which 0 would not.
    if beam_size is not None:
        options.beam_size = beam_size
    if max_length is not None:
        options.max_length = max_length
    if length_penalty is not None:
        options.length_penalty = length_penalty
    kinds = []
    for kind in attention:
        if isinstance(kind, str):
            if kind not in ATTENTION_KINDS:
                raise ValueError(f"unknown attention kind {kind!r}; expected some of {list(ATTENTION_KINDS)}")
            kinds.append(ATTENTION_KINDS[kind])
        else:
            kinds.append(int(kind))
    if kinds:
        options.attention.kinds.extend(dict.fromkeys(kinds))  # each kind at most once, order kept
        options.attention.layers.extend(layers)
        options.attention.heads.extend(heads)
    return options


class TranslatorClient:
    """A connection to a translator server. Thread-safe; close it (or use `with`) when done."""

    def __init__(self, target: str = DEFAULT_SERVER, *, tls: bool = False,
                 root_certificates: bytes | str | Path | None = None, timeout: float | None = None,
                 token: str | None = None) -> None:
        """`timeout` (seconds) becomes each call's deadline; `root_certificates` (PEM bytes or a file path)
        implies TLS, which otherwise uses the system's roots; `token` is sent as `authorization: Bearer`
        with every call (servers started with --auth-tokens-file ask for one)."""
        self.target = target
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        channel_options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                           ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        if tls or root_certificates is not None:
            if isinstance(root_certificates, str | Path):
                root_certificates = Path(root_certificates).read_bytes()
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, credentials, options=channel_options)
        else:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        self._stub = pb_grpc.TranslatorStub(self._channel)

    def __enter__(self) -> TranslatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _error(self, error: grpc.RpcError) -> TranslatorError:
        code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = (error.details() if isinstance(error, grpc.Call) else None) or str(error)
        if code == grpc.StatusCode.UNAVAILABLE:
            return ServerUnavailableError(code, f"cannot reach the translator server at {self.target} "
                                                f"(is it running? set --server or ${SERVER_ENV}): {details}")
        return TranslatorError(code, details)

    def translate(self, texts: str | Iterable[str], *, beam_size: int | None = None,
                  max_length: int | None = None, length_penalty: float | None = None,
                  replace_unknowns: bool = False, attention: Iterable[str | int] = (),
                  layers: Iterable[int] = (), heads: Iterable[int] = ()) -> list[ClientTranslation]:
        """Translate texts in one request; one result per text, in order. `attention` names the maps to return
        ("cross", "decoder_self", "encoder_self"), restricted to `layers` and `heads` (empty: all)."""
        # Once, as a list: a lone string would otherwise be sent as one text per character, and a generator
        # would be used up by the request, leaving nothing to pair the results with.
        texts = [texts] if isinstance(texts, str) else list(texts)
        options = _options(beam_size, max_length, length_penalty, replace_unknowns, attention, layers, heads)
        request = pb.TranslateRequest(texts=texts, options=options)
        try:
            response = self._stub.Translate(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._error(error) from None
        if len(response.translations) != len(texts):
            raise TranslatorError(grpc.StatusCode.INTERNAL,
                                  f"the server answered {len(response.translations)} translations for "
                                  f"{len(texts)} texts")
        return [_translation(t, source) for t, source in zip(response.translations, texts, strict=True)]

    def stream(self, text: str, *, beam_size: int | None = None, max_length: int | None = None,
               length_penalty: float | None = None, replace_unknowns: bool = False,
               attention: Iterable[str | int] = (), layers: Iterable[int] = (),
               heads: Iterable[int] = ()) -> Iterator[str | ClientTranslation]:
        """Yield each target token (a str, "</s>" included) as the server generates it, then the
        ClientTranslation. Closing the generator early cancels the call on the server."""
        options = _options(beam_size, max_length, length_penalty, replace_unknowns, attention, layers, heads)
        call = self._stub.TranslateStream(pb.TranslateStreamRequest(text=text, options=options),
                                          timeout=self.timeout, metadata=self._metadata)
        try:
            for message in call:
                if message.HasField("token"):
                    yield message.token.token
                elif message.HasField("translation"):
                    yield _translation(message.translation, text)
        except grpc.RpcError as error:
            raise self._error(error) from None
        finally:
            call.cancel()  # no-op once finished; frees the server's work if the consumer stopped early

    def model_info(self) -> ModelInfo:
        try:
            info = self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout,
                                           metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._error(error) from None
        return ModelInfo(name=info.name, version=info.version, architecture=_fields(info.architecture),
                         source_vocab_size=info.source_vocab_size, target_vocab_size=info.target_vocab_size,
                         execution_provider=info.execution_provider, batching=_fields(info.batching),
                         precision=info.precision or "float32",
                         limits=_fields(info.limits), training_metrics=dict(info.training_metrics))


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def _indices(value: str) -> list[int]:
    try:
        return [int(v) for v in value.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="translator-client",
        description="Translate English texts with a translator server. Texts come from the arguments, or one "
                    "per line from stdin when none are given.")
    parser.add_argument("texts", nargs="*", help="texts to translate (default: read stdin, one per line)")
    parser.add_argument("--server", type=server_address, default=os.environ.get(SERVER_ENV, DEFAULT_SERVER),
                        help=f"host:port of the server (default: ${SERVER_ENV} or {DEFAULT_SERVER})")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system root certificates)")
    parser.add_argument("--root-certificates", type=Path,
                        help="PEM file of root certificates (implies --tls)")
    parser.add_argument("--timeout", type=positive_float, help="deadline of each call, in seconds")
    parser.add_argument("--token-file", type=input_file,
                        help=f"file holding the bearer token to send (default: ${TOKEN_ENV}, if set)")
    parser.add_argument("--beam-size", type=int, help="number of beams (1: greedy; default: the server's)")
    parser.add_argument("--max-length", type=int, help="most decoding steps (default: the server's)")
    parser.add_argument("--length-penalty", type=float, help="length penalty alpha (default: the server's)")
    parser.add_argument("--replace-unknowns", action="store_true",
                        help="replace <unk> in the output with the source word it attends to most")
    parser.add_argument("--attention", type=output_file, metavar="MAPS.png",
                        help="render cross-attention heatmaps to this PNG (one file per text when there are "
                             "several: MAPS-1.png, MAPS-2.png, ...)")
    parser.add_argument("--html", type=output_file, metavar="VIEW.html",
                        help="write an offline attention explorer page (all attention kinds, all texts)")
    parser.add_argument("--layers", type=_indices, default=[], help="attention layers to keep, e.g. 0,2")
    parser.add_argument("--heads", type=_indices, default=[], help="attention heads to keep, e.g. 0,1")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per text (translation, tokens, score, timings, "
                             "unknown words)")
    parser.add_argument("--json-attention", action="store_true",
                        help="--json with the cross-attention maps included (all kinds when --html is given)")
    parser.add_argument("--stream", action="store_true", help="print target tokens as they are generated")
    parser.add_argument("--info", action="store_true", help="print the served model's description")
    return parser


def _print_info(info: ModelInfo, as_json: bool, out: TextIO) -> None:
    if as_json:
        print(json.dumps({"model_info": info.to_dict()}, ensure_ascii=False), file=out)
        return
    a = info.architecture
    print(f"model        {info.name} (version {info.version or '?'}, {info.precision}) on "
          f"{info.execution_provider}", file=out)
    print(f"architecture d_model={a.get('d_model')} heads={a.get('n_heads')} "
          f"encoder_layers={a.get('n_encoder_layers')} decoder_layers={a.get('n_decoder_layers')} "
          f"d_ff={a.get('d_ff')}", file=out)
    print(f"vocabulary   source={info.source_vocab_size} target={info.target_vocab_size}", file=out)
    print("batching     " + " ".join(f"{k}={v}" for k, v in info.batching.items()), file=out)
    print("limits       " + " ".join(f"{k}={v}" for k, v in info.limits.items()), file=out)
    if info.training_metrics:
        print("metrics      " + " ".join(f"{k}={v:.4g}" for k, v in sorted(info.training_metrics.items())),
              file=out)


def _read_texts(arguments: list[str], stdin: TextIO) -> list[str]:
    if arguments:
        return arguments
    # A byte-order mark that an editor put at the start of the file is not part of the first text.
    return [text for line in stdin if (text := line.lstrip("\ufeff").strip())]


def _run(args: argparse.Namespace, stdin: TextIO, out: TextIO, err: TextIO) -> int:
    args.json = args.json or args.json_attention
    if not args.texts and not args.info and stdin.isatty():
        print("reading texts from stdin, one per line (end with Ctrl-D)", file=err)
    texts = [] if args.info and not args.texts else _read_texts(args.texts, stdin)
    if not texts and not args.info:
        print("error: no text to translate: give texts as arguments or one per line on stdin", file=err)
        return 2
    kinds: list[str] = []
    if args.attention is not None or args.json_attention:
        kinds.append("cross")
    if args.html is not None:
        kinds = list(ATTENTION_KINDS)
    options: dict[str, Any] = dict(beam_size=args.beam_size, max_length=args.max_length,
                                   length_penalty=args.length_penalty, replace_unknowns=args.replace_unknowns,
                                   attention=kinds, layers=args.layers, heads=args.heads)
    results: list[ClientTranslation] = []
    token = args.token_file.read_text().strip() if args.token_file else os.environ.get(TOKEN_ENV) or None
    with TranslatorClient(args.server, tls=args.tls, root_certificates=args.root_certificates,
                          timeout=args.timeout, token=token) as client:
        if args.info:
            _print_info(client.model_info(), args.json, out)
        if args.stream:
            for text in texts:
                results.append(_stream_one(client, text, options, args.json, args.json_attention, out, err))
        elif texts:
            # Respect the server's per-request limit so that long stdin inputs work without tuning.
            chunk = len(texts)
            if len(texts) > 1:
                chunk = client.model_info().limits.get("max_texts_per_request") or len(texts)
            for start in range(0, len(texts), chunk):
                batch = _translate_fitting(client, texts[start:start + chunk], options)
                for result in batch:
                    _print_result(result, args.json, args.json_attention, out)
                results.extend(batch)
    if args.attention is not None and results:
        pictures = _picture_module()
        for result, path in zip(results, pictures.png_paths(args.attention, len(results)), strict=True):
            cross = result.attention.get("cross")
            if cross is None:
                print(f"warning: the server sent no cross-attention for {result.source!r}", file=err)
                continue
            pictures.render_cross_attention_png(path, cross.column_tokens, cross.row_tokens, cross.weights,
                                       cross.layers, cross.heads, title=f"{result.source}  →  {result.text}")
            print(f"wrote {path}", file=err)
    if args.html is not None and results:
        write_attention_html(args.html, results)
        print(f"wrote {args.html}", file=err)
    return 0


def _translate_fitting(
    client: TranslatorClient, texts: list[str], options: dict[str, Any]
) -> list[ClientTranslation]:
    """One request for the texts, or, when its answer (attention maps grow with the square of a text's
    length) would exceed the server's max_message_bytes, two requests of half as many, and so on down to one
    text, whose own answer must fit."""
    try:
        return client.translate(texts, **options)
    except TranslatorError as error:
        too_big = error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_message_bytes" in error.message
        if not too_big or len(texts) == 1:
            raise
    half = len(texts) // 2
    first = _translate_fitting(client, texts[:half], options)
    return first + _translate_fitting(client, texts[half:], options)


def _print_result(result: ClientTranslation, as_json: bool, with_attention: bool, out: TextIO) -> None:
    if as_json:
        print(json.dumps(result.to_dict(include_attention=with_attention), ensure_ascii=False), file=out)
    else:
        print(result.text, file=out)


def _stream_one(client: TranslatorClient, text: str, options: dict[str, Any], as_json: bool,
                with_attention: bool, out: TextIO, err: TextIO) -> ClientTranslation:
    # With --json, stdout keeps exactly one object per text, so the live tokens go to stderr.
    live = err if as_json else out
    shown: list[str] = []
    final: ClientTranslation | None = None
    for event in client.stream(text, **options):
        if isinstance(event, ClientTranslation):
            final = event
        elif event != "</s>":
            print(("" if not shown else " ") + event, end="", file=live, flush=True)
            shown.append(event)
    print(file=live, flush=True)
    if final is None:
        raise TranslatorError(grpc.StatusCode.INTERNAL, "the stream ended without a translation")
    if as_json:
        _print_result(final, True, with_attention, out)
    elif final.text != " ".join(shown):
        print(final.text, file=out)  # e.g. --replace-unknowns rewrote the <unk> the stream showed
    return final


def _picture_module() -> Any:
    """The PNG renderer, imported only when a picture is asked for: matplotlib comes with the `client`
    extra, and the client translates without it."""
    from service.client import attention_png

    return attention_png


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.attention is not None:
        try:
            _picture_module()
        except ImportError as error:  # refused before any call, like any other bad argument
            parser.error(f"--attention draws with matplotlib, which is not installed ({error}): "
                         "pip install 'translator[client]'")
    try:
        return _run(args, sys.stdin, sys.stdout, sys.stderr)
    except TranslatorError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:  # unwritable output file, unreadable certificates, bad kind
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
