"""Translation with the PyTorch model through the shared numpy search of ``service.core.search``.

``TorchBackend`` adapts ``Transformer.encode / cross_keys_values / decode_step`` to the ``StepBackend``
protocol (docs/CONTRACTS.md), so evaluation in PyTorch and serving with onnxruntime run the very same search.
Tensors stay torch (on the model's device) inside the state; numpy appears only at the protocol boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model.transformer import Transformer
from service.core.options import max_steps
from service.core.search import Hypothesis, padded, search


@dataclass
class TorchState:
    """Decoder state of N running rows (hypotheses)."""

    self_key: Tensor  # [L,N,H,t,Dh]
    self_value: Tensor  # [L,N,H,t,Dh]
    cross_key: Tensor  # [L,N,H,S,Dh]
    cross_value: Tensor  # [L,N,H,S,Dh]
    src_padding_mask: Tensor  # [N,S], True = padding


class TorchBackend:
    """``StepBackend`` over a ``Transformer``. Puts the model in eval mode: search must be deterministic."""

    def __init__(self, model: Transformer) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device

    def encode(self, src_ids: np.ndarray, with_attention: bool) -> tuple[TorchState, np.ndarray | None]:
        """src_ids int64 [B,S] right-padded -> (state, encoder attention [B,L,H,S,S] or None)."""
        with torch.inference_mode():
            src = torch.as_tensor(np.asarray(src_ids, dtype=np.int64), device=self.device)
            padding = self.model.padding_mask(src)
            memory, encoder_attention = self.model.encode(src, padding)
            cross_key, cross_value = self.model.cross_keys_values(memory)
            self_key, self_value = self.model.empty_cache(src.shape[0], self.device)
            state = TorchState(self_key, self_value, cross_key, cross_value, padding)
            attention = _to_numpy(encoder_attention.transpose(0, 1)) if with_attention else None
        return state, attention

    def step(
        self, state: TorchState, tokens: np.ndarray, with_attention: bool
    ) -> tuple[TorchState, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """tokens int64 [N] -> (state, log_probs float32 [N,V], cross [N,L,H,S], self [N,L,H,t+1])."""
        with torch.inference_mode():
            previous = torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=self.device)
            log_probs, self_key, self_value, cross, self_attention = self.model.decode_step(
                previous,
                state.self_key,
                state.self_value,
                state.cross_key,
                state.cross_value,
                state.src_padding_mask,
            )
            new_state = TorchState(
                self_key, self_value, state.cross_key, state.cross_value, state.src_padding_mask
            )
            # [L,N,H,1,K] -> [N,L,H,K]
            cross_np = _to_numpy(cross[:, :, :, 0].transpose(0, 1)) if with_attention else None
            self_np = _to_numpy(self_attention[:, :, :, 0].transpose(0, 1)) if with_attention else None
            return new_state, _to_numpy(log_probs), cross_np, self_np

    def select(self, state: TorchState, rows: np.ndarray) -> TorchState:
        """Keep / reorder / repeat rows (beam expansion, reordering, dropping finished rows)."""
        with torch.inference_mode():
            index = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=self.device)
            return TorchState(
                state.self_key.index_select(1, index),
                state.self_value.index_select(1, index),
                state.cross_key.index_select(1, index),
                state.cross_value.index_select(1, index),
                state.src_padding_mask.index_select(0, index),
            )


def _to_numpy(x: Tensor) -> np.ndarray:
    return x.float().cpu().numpy()


def translate_ids(
    model: Transformer,
    src_ids: list[list[int]],
    *,
    beam_size: int = 1,
    max_length: int | None = None,
    length_penalty: float = 1.0,
    with_attention: bool = False,
) -> list[Hypothesis]:
    """Translate a batch of source id lists (each ending with </s>) with greedy or beam search.

    Each sentence may take the decoding steps the service's length rule gives it (`max_steps`: from its own
    source length, or ``max_length`` when given), capped by the model's position table; the server also
    caps at its --max-length-limit (256 by default), which only sources of 124 tokens or more reach. The
    model is left in the train/eval mode it came in.
    """
    if not src_ids:
        return []
    config = model.config
    limits = np.array([max_steps(len(source), max_length, config.max_positions) for source in src_ids])
    was_training = model.training
    try:
        results = search(
            TorchBackend(model),
            padded(src_ids, config.pad_id),
            pad_id=config.pad_id,
            bos_id=config.bos_id,
            eos_id=config.eos_id,
            beam_size=beam_size,
            max_length=limits,
            length_penalty=length_penalty,
            with_attention=with_attention,
        )
    finally:
        model.train(was_training)
    assert all(result is not None for result in results)  # only abandoned rows yield None
    return [result for result in results if result is not None]
