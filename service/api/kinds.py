"""Attention kinds: the engine's names (service.core.options.ATTENTION_KINDS) and the translator.v1 wire enum."""

from __future__ import annotations

from service.api.translator.v1 import translator_pb2 as pb

KIND_ENUMS: dict[str, int] = {
    "cross": pb.CROSS,
    "decoder_self": pb.DECODER_SELF,
    "encoder_self": pb.ENCODER_SELF,
}
KIND_NAMES: dict[int, str] = {value: name for name, value in KIND_ENUMS.items()}
