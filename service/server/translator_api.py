"""The translator.v1.Translator service: requests to batcher jobs, engine translations to messages."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np

from service.api.kinds import KIND_ENUMS, KIND_NAMES
from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc
from service.core.model_format import Architecture
from service.core.options import TranslateOptions
from service.core.postprocess import Translation
from service.core.vocabulary import BOS
from service.engine.engine import Engine
from service.scheduler.job import TextResult
from service.scheduler.status import invalid
from service.server.accounting import tracked, tracked_stream
from service.server.requests import (
    NO_SELECTION,
    AttentionSelection,
    Limits,
    check_selection,
    check_selection_sizes,
    encode_texts,
    longer_than_training,
    make_options,
)
from service.server.runtime import Runtime, Work, submit_job

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Translator"].full_name


def parse_options(
    options: pb.TranslateOptions, limits: Limits, engine: Engine
) -> tuple[TranslateOptions, AttentionSelection]:
    attention = options.attention
    selection = NO_SELECTION
    if attention.kinds or attention.layers or attention.heads:  # most calls ask for no maps: nothing to check
        selection = parse_selection(attention, engine.model.architecture)
    translate_options = make_options(
        limits,
        beam_size=options.beam_size if options.HasField("beam_size") else None,
        max_length=options.max_length if options.HasField("max_length") else None,
        length_penalty=options.length_penalty if options.HasField("length_penalty") else None,
        replace_unknowns=options.replace_unknowns,
        attention=selection.kinds,
    )
    return translate_options, selection


def parse_selection(attention: pb.AttentionRequest, architecture: Architecture) -> AttentionSelection:
    check_selection_sizes(
        len(attention.kinds), len(attention.layers), len(attention.heads), architecture, "options.attention"
    )
    kinds = []
    for kind in attention.kinds:
        if kind not in KIND_NAMES:
            name = pb.AttentionKind.Name(kind) if kind in pb.AttentionKind.values() else str(kind)
            raise invalid(
                f"options.attention.kinds: {name} is not a kind to ask for; use CROSS, DECODER_SELF or "
                "ENCODER_SELF"
            )
        kinds.append(KIND_NAMES[kind])
    selection = AttentionSelection(tuple(kinds), tuple(attention.layers), tuple(attention.heads))
    check_selection(selection, architecture, where="options.attention")
    return selection


def attention_maps(translation: Translation, selection: AttentionSelection) -> list[pb.AttentionMap]:
    maps = []
    target, source = list(translation.target_tokens), list(translation.source_tokens)
    for kind in selection.kinds:
        if kind == "cross":
            weights, rows, columns = translation.cross_attention, target, source
        elif kind == "decoder_self":
            weights, rows, columns = translation.decoder_self_attention, target, [BOS, *target[:-1]]
        else:
            weights, rows, columns = translation.encoder_attention, source, source
        assert weights is not None, f"the engine computed no {kind} attention"
        layers = list(selection.layers) or list(range(weights.shape[0]))
        heads = list(selection.heads) or list(range(weights.shape[1]))
        chosen = np.ascontiguousarray(weights[np.ix_(layers, heads)], dtype=np.float32)
        maps.append(
            pb.AttentionMap(
                kind=KIND_ENUMS[kind],
                layers=layers,
                heads=heads,
                row_tokens=rows,
                column_tokens=columns,
                weights=pb.Tensor(shape=list(chosen.shape), data=chosen.ravel().tolist()),
            )
        )
    return maps


def attention_bytes(
    engine: Engine, selection: AttentionSelection, source_length: int, target_length: int
) -> int:
    """The float32 bytes of the maps `selection` asks for, for one text of these lengths (</s> included)."""
    architecture = engine.model.architecture
    cells = {
        "cross": target_length * source_length,
        "decoder_self": target_length * target_length,
        "encoder_self": source_length * source_length,
    }
    total = 0
    for kind in selection.kinds:
        layers = architecture.n_encoder_layers if kind == "encoder_self" else architecture.n_decoder_layers
        heads = len(selection.heads) or architecture.n_heads
        total += (len(selection.layers) or layers) * heads * cells[kind]
    return 4 * total


def translation_message(
    result: TextResult, selection: AttentionSelection, arrival: float, engine: Engine
) -> pb.Translation:
    translation = result.translation
    return pb.Translation(
        longer_than_training=longer_than_training(engine, len(translation.source_tokens)),
        text=translation.text,
        source_tokens=translation.source_tokens,
        target_tokens=translation.target_tokens,
        score=translation.score,
        log_prob=translation.log_prob,
        unknown_words=translation.unknown_words,
        attention=attention_maps(translation, selection),
        timings=pb.Timings(
            queue_ms=result.queue_ms,
            compute_ms=result.compute_ms,
            total_ms=(time.monotonic() - arrival) * 1000,
        ),
    )


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """model.json's training metrics as the API names them: a number by its name, one of a split's numbers
    (`{"test": {"bleu": 99.5}}`) as `test_bleu`; lists (per layer and head) and flags are left out."""

    def number(value: object) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    flat: dict[str, float] = {}
    for name, value in metrics.items():
        if number(value):
            flat[name] = float(value)
        elif isinstance(value, dict):
            flat.update({f"{name}_{key}": float(inner) for key, inner in value.items() if number(inner)})
    return flat


def model_info(runtime: Runtime) -> pb.ModelInfo:
    engine, _, limits = runtime.serving()
    model, config = engine.model, runtime.config
    architecture = model.architecture
    metrics = flat_metrics(model.metrics)
    return pb.ModelInfo(
        name=model.name,
        version=str(model.version),
        architecture=pb.Architecture(
            d_model=architecture.d_model,
            n_heads=architecture.n_heads,
            n_encoder_layers=architecture.n_encoder_layers,
            n_decoder_layers=architecture.n_decoder_layers,
            d_ff=architecture.d_ff,
        ),
        source_vocab_size=architecture.src_vocab_size,
        target_vocab_size=architecture.tgt_vocab_size,
        execution_provider=engine.provider,
        precision=model.precision,
        batching=pb.BatchingSettings(
            max_batch_size=config.max_batch_size,
            max_batch_tokens=config.max_batch_tokens,
            max_queue_delay_ms=config.max_queue_delay_ms,
            max_queue_size=config.max_queue_size,
        ),
        limits=pb.Limits(
            max_texts_per_request=limits.max_texts_per_request,
            max_tokens_per_text=limits.max_tokens_per_text,
            max_beam_size=limits.max_beam_size,
            max_length=limits.max_length,
        ),
        training_metrics=metrics,
    )


class TranslatorService(pb_grpc.TranslatorServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @tracked("Translate", limited=True)
    async def Translate(
        self, request: pb.TranslateRequest, context: grpc.aio.ServicerContext
    ) -> pb.TranslateResponse:
        def prepare(engine: Engine, limits: Limits) -> Work:
            options, selection = parse_options(request.options, limits, engine)
            sources = encode_texts(engine, list(request.texts), limits)
            if selection.kinds:
                # Refused before any work when the maps alone, at one target token each, cannot fit: the
                # encoder maps of 128 long texts are ~400 MB, known from the request.
                least = sum(attention_bytes(engine, selection, len(source.ids), 1) for source in sources)
                self.runtime.check_bytes(least, at_least=True)
            return Work(sources, options, selection)

        def build(results: list[TextResult]) -> pb.TranslateResponse:
            arrival, selection = call.job.arrival, call.work.answer
            if selection.kinds:
                # Sized from the maps before the message is built: building a message costs about four times
                # its size in Python floats at the peak.
                self.runtime.check_bytes(sum(
                    attention_bytes(call.engine, selection, len(t.source_tokens), len(t.target_tokens))
                    for t in (result.translation for result in results)
                ))
            response = pb.TranslateResponse(
                translations=[translation_message(r, selection, arrival, call.engine) for r in results]
            )
            self.runtime.check_size(response)
            return response

        with submit_job(self.runtime, context, prepare) as call:
            return await call.answer(build)

    @tracked_stream("TranslateStream", limited=True)
    async def TranslateStream(
        self, request: pb.TranslateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TranslateStreamResponse]:
        def prepare(engine: Engine, limits: Limits) -> Work:
            options, selection = parse_options(request.options, limits, engine)
            sources = encode_texts(engine, [request.text], limits, field="text")
            return Work(sources, options, selection)

        def build(results: list[TextResult]) -> tuple[TextResult, pb.TranslateStreamResponse]:
            (result,) = results
            message = pb.TranslateStreamResponse(
                translation=translation_message(result, call.work.answer, call.job.arrival, call.engine)
            )
            self.runtime.check_size(message)
            return result, message

        with submit_job(self.runtime, context, prepare, stream=True) as call:
            vocabulary = call.engine.vocabulary
            sent = 0
            async with contextlib.aclosing(call.tokens()) as tokens:
                async for token_id in tokens:
                    yield pb.TranslateStreamResponse(
                        token=pb.TokenEvent(
                            index=sent, token_id=token_id, token=vocabulary.id_to_token(token_id)
                        )
                    )
                    sent += 1
            result, message = await call.answer(build)
        translation = result.translation
        # The search never streams "</s>"; the events still cover every target token, like target_tokens.
        ids = list(translation.token_ids)
        if len(translation.target_tokens) > len(ids):
            ids.append(vocabulary.eos_id)
        for index in range(sent, len(ids)):
            yield pb.TranslateStreamResponse(
                token=pb.TokenEvent(
                    index=index, token_id=ids[index], token=vocabulary.id_to_token(ids[index])
                )
            )
        yield message

    @tracked("GetModelInfo")
    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        return model_info(self.runtime)
