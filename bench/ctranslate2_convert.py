"""Our checkpoint as a CTranslate2 model folder, for the side-by-side `translator-bench engine`.

The result must decode exactly like our engine (greedy tokens equal), so every difference between the two
architectures is settled here rather than left to CTranslate2's defaults:

* Absolute positions: CTranslate2's built-in sinusoid is ``[sin | cos]`` concatenated and starts at position
  1; ours interleaves sin/cos from position 0. We store our own table in ``position_encodings.encodings``,
  which CTranslate2 then indexes by step directly (encoder from 0, decoder step t at t, as ``decode_step``
  does).
* Relative positions: CTranslate2's T5 relative attention bias, per self-attention layer: the same
  ``[buckets, heads]`` table, the same bucket function (bidirectional in the encoder, unidirectional in the
  decoder, float32 logarithms, truncated) and the same maximum distance; no position table.
* Layer norm epsilon: torch's ``nn.LayerNorm`` uses 1e-5; CTranslate2 uses 1e-5 for a norm with a beta when
  the config leaves ``layer_norm_epsilon`` unset (1e-6 only for RMS norms). They agree, but we write ours
  into the config so a future default change cannot silently diverge.
* Source </s>: our source ids already end with </s> (service.core.vocabulary.encode_source) and
  ``add_source_eos`` stays False, so callers pass exactly the tokens of our ids (see ``source_tokens``).
* Output projection: tied to the target embedding, no bias (CTranslate2 aliases the duplicate on save).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import ctranslate2
import numpy as np
from ctranslate2.specs import common_spec, transformer_spec
from torch import nn

from model.transformer import DecoderLayer, EncoderLayer, MultiHeadAttention, Transformer, TransformerConfig
from service.core.vocabulary import BOS, EOS, UNK, Vocabulary

# What CTranslate2 picks for a layer norm with beta when the config has no epsilon (src/layers/common.cc).
CTRANSLATE2_DEFAULT_LAYER_NORM_EPSILON = 1e-5


def _array(tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().cpu().float().numpy())


def _set_linear(spec, *linears: nn.Linear) -> None:
    """A CTranslate2 linear from torch linears fused along the output axis ([out, in] layout)."""
    spec.weight = np.concatenate([_array(linear.weight) for linear in linears], axis=0)
    spec.bias = np.concatenate([_array(linear.bias) for linear in linears], axis=0)


def _set_norm(spec, norm: nn.LayerNorm) -> None:
    spec.gamma = _array(norm.weight)
    spec.beta = _array(norm.bias)


def _set_self_attention(spec, layer: EncoderLayer | DecoderLayer, config: TransformerConfig) -> None:
    _set_norm(spec.layer_norm, layer.norm1)
    _set_linear(spec.linear[0], layer.self_attn.query, layer.self_attn.key, layer.self_attn.value)
    _set_linear(spec.linear[1], layer.self_attn.output)
    if layer.relative_bias is not None:
        spec.relative_attention_bias = _array(layer.relative_bias.bias.weight)  # [buckets, heads]
        spec.relative_attention_max_distance = np.dtype("int32").type(config.relative_max_distance)


def _set_cross_attention(spec, attention: MultiHeadAttention, norm: nn.LayerNorm) -> None:
    _set_norm(spec.layer_norm, norm)
    _set_linear(spec.linear[0], attention.query)
    _set_linear(spec.linear[1], attention.key, attention.value)
    _set_linear(spec.linear[2], attention.output)


def _layer_norm_epsilon(model: Transformer) -> float:
    epsilons = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    if len(epsilons) != 1:
        raise ValueError(f"CTranslate2 has one layer-norm epsilon per model, ours has {sorted(epsilons)}")
    return float(epsilons.pop())


def vocabulary_tokens(vocabulary: Vocabulary) -> list[str]:
    """Token strings in id order; CTranslate2 maps strings back to ids with this very list."""
    tokens = [vocabulary.tokenizer.id_to_token(i) for i in range(vocabulary.size)]
    missing = [i for i, token in enumerate(tokens) if token is None]
    if missing:
        raise ValueError(f"the vocabulary has no token for ids {missing[:10]}")
    if len(set(tokens)) != len(tokens):
        raise ValueError("the vocabulary has duplicate token strings: CTranslate2 could not map them back")
    return tokens  # type: ignore[return-value]


def source_tokens(vocabulary: Vocabulary, ids: list[int]) -> list[str]:
    """The CTranslate2 input for our source ids (which already end with </s>): one string per id."""
    return [vocabulary.tokenizer.id_to_token(i) for i in ids]


def build_spec(model: Transformer, vocabulary: Vocabulary) -> transformer_spec.TransformerSpec:
    config = model.config
    if config.src_vocab_size != vocabulary.size or config.tgt_vocab_size != vocabulary.size:
        raise ValueError(f"joint vocabulary of {vocabulary.size} tokens, but the model has "
                         f"{config.src_vocab_size} source / {config.tgt_vocab_size} target embeddings")
    for name, ours, theirs in (("pad", config.pad_id, vocabulary.pad_id),
                               ("bos", config.bos_id, vocabulary.bos_id),
                               ("eos", config.eos_id, vocabulary.eos_id),
                               ("unk", config.unk_id, vocabulary.unk_id)):
        if ours != theirs:
            raise ValueError(f"{name} id {ours} in the model config, {theirs} in the tokenizer")
    # Our FeedForward is hard-wired to ReLU (model/transformer.py), CTranslate2's RELU is the same function.
    relative = config.positions == "relative"
    spec = transformer_spec.TransformerSpec.from_config(
        (config.n_encoder_layers, config.n_decoder_layers), config.n_heads, pre_norm=True,
        activation=common_spec.Activation.RELU, relative_attention_bias=relative)

    encoder, decoder = spec.encoder, spec.decoder
    if model.positions is not None:
        positions = _array(model.positions.table)  # [max_positions, D], interleaved sin/cos, position 0 first
        encoder.position_encodings.encodings = positions
        decoder.position_encodings.encodings = positions
    encoder.embeddings[0].weight = _array(model.src_embed.weight)
    encoder.scale_embeddings = True  # x sqrt(d_model), as Transformer._embed
    for layer_spec, layer in zip(encoder.layer, model.encoder_layers, strict=True):
        _set_self_attention(layer_spec.self_attention, layer, config)
        _set_norm(layer_spec.ffn.layer_norm, layer.norm2)
        _set_linear(layer_spec.ffn.linear_0, layer.feed_forward.linear1)
        _set_linear(layer_spec.ffn.linear_1, layer.feed_forward.linear2)
    _set_norm(encoder.layer_norm, model.encoder_norm)

    decoder.embeddings.weight = _array(model.tgt_embed.weight)
    decoder.scale_embeddings = True
    for layer_spec, layer in zip(decoder.layer, model.decoder_layers, strict=True):
        _set_self_attention(layer_spec.self_attention, layer, config)
        _set_cross_attention(layer_spec.attention, layer.cross_attn, layer.norm2)
        _set_norm(layer_spec.ffn.layer_norm, layer.norm3)
        _set_linear(layer_spec.ffn.linear_0, layer.feed_forward.linear1)
        _set_linear(layer_spec.ffn.linear_1, layer.feed_forward.linear2)
    _set_norm(decoder.layer_norm, model.decoder_norm)
    decoder.projection.weight = _array(model.tgt_embed.weight)  # tied output, no bias

    tokens = vocabulary_tokens(vocabulary)
    spec.register_source_vocabulary(tokens)
    spec.register_target_vocabulary(tokens)
    spec.config.unk_token = UNK
    spec.config.bos_token = BOS
    spec.config.eos_token = EOS
    spec.config.decoder_start_token = BOS
    spec.config.add_source_bos = False
    spec.config.add_source_eos = False  # our token lists carry </s> already
    spec.config.layer_norm_epsilon = _layer_norm_epsilon(model)
    spec.validate()
    return spec


def convert_model(model: Transformer, vocabulary: Vocabulary, out_dir: str | Path,
                  quantization: str | None = None) -> Path:
    """Write a loaded model as a CTranslate2 folder (replacing one that is there)."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    spec = build_spec(model.eval(), vocabulary)
    spec.optimize(quantization=quantization)
    spec.save(str(out))
    return out


def convert_to_ctranslate2(checkpoint_dir: str | Path, out_dir: str | Path,
                           quantization: str | None = None) -> Path:
    """A `translator-train` checkpoint folder -> a CTranslate2 folder (float32 unless ``quantization``)."""
    from model.checkpoint import load_model

    model, vocabulary, _ = load_model(checkpoint_dir)
    out = convert_model(model, vocabulary, out_dir, quantization)
    summary = {"checkpoint": str(Path(checkpoint_dir).resolve()), "quantization": quantization,
               "ctranslate2": ctranslate2.__version__,
               "layer_norm_epsilon": {"ours": _layer_norm_epsilon(model),
                                      "ctranslate2_default": CTRANSLATE2_DEFAULT_LAYER_NORM_EPSILON}}
    (out / "translator_conversion.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/toy-en-es")
    parser.add_argument("--out", required=True)
    parser.add_argument("--quantization", default=None, help="e.g. int8 (default: keep float32)")
    args = parser.parse_args(argv)
    print(convert_to_ctranslate2(args.checkpoint, args.out, args.quantization))


if __name__ == "__main__":
    main()
