"""A KV cache whose layers grow in place: a decode step writes its position into spare room.

transformers' `DynamicCache` concatenates every layer's keys and values with the new position on
every step, copying the whole cache each time (on a 32-row decode of a 10M model that was about a
tenth of the step). Here each layer keeps buffers with room past the sequence and exposes
`keys`/`values` as views of the filled part; room runs out every `GROW` or more steps (small
caches are still concatenated: attention over a contiguous tensor is faster there). Whoever
replaces `keys`/`values` outright (rows leaving, batches merging) is adopted at the next update.
Knows full-attention layers only (no sliding windows), as the decode loop does.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

GROW = 64   # spare positions added when a layer's buffers are full (at least; a quarter more on long ones)
# Below this many bytes per layer's keys, concatenating is as fast: attention over a view of a larger
# buffer is slower than over a contiguous tensor (measured on the 2-core VM: even at 8 rows x 150
# positions of a 10M model; 1.6-2x faster at 32 rows x 100-300 positions, where each concatenation
# allocated megabytes afresh).
CONTIGUOUS_BYTES = 1 << 20


class GrowingLayer(DynamicLayer):
    """`keys`/`values` [B, H, L, D] are views of buffers [B, H, capacity, D]."""

    _keys_buffer: torch.Tensor | None = None
    _values_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.keys, self.values
        if keys is None or values is None or keys.numel() == 0:
            keys, values = key_states[:, :, :0], value_states[:, :, :0]
        length = keys.shape[-2] + key_states.shape[-2]
        if key_states[:, :, :1].nbytes * length < CONTIGUOUS_BYTES:
            self._keys_buffer = self._values_buffer = None
            self.keys = torch.cat([keys, key_states], dim=-2)
            self.values = torch.cat([values, value_states], dim=-2)
            return self.keys, self.values
        keys_buffer, values_buffer = self._keys_buffer, self._values_buffer
        if (keys_buffer is None or values_buffer is None or not _view_of(keys, keys_buffer)
                or not _view_of(values, values_buffer) or length > keys_buffer.shape[-2]):
            capacity = length + max(GROW, length // 4)
            keys_buffer, values_buffer = _with_room(keys, capacity), _with_room(values, capacity)
            self._keys_buffer, self._values_buffer = keys_buffer, values_buffer
        keys_buffer[:, :, keys.shape[-2]:length] = key_states
        values_buffer[:, :, keys.shape[-2]:length] = value_states
        self.keys, self.values = keys_buffer[:, :, :length], values_buffer[:, :, :length]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.keys is not None and self.values is not None and self.get_seq_length() > 0:
            self.keys, self.values = self.keys[indices], self.values[indices]


def _view_of(tensor: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether `tensor` is still the filled part of `buffer` (nobody replaced it since)."""
    return tensor.data_ptr() == buffer.data_ptr() and tensor.shape[:2] == buffer.shape[:2]


def _with_room(tensor: torch.Tensor, capacity: int) -> torch.Tensor:
    """A buffer of `capacity` positions starting with `tensor`'s."""
    shape = list(tensor.shape)
    shape[-2] = capacity
    buffer = tensor.new_empty(shape)
    buffer[:, :, :tensor.shape[-2]] = tensor
    return buffer


class GrowingCache(DynamicCache):
    """A `DynamicCache` whose layers are `GrowingLayer`s."""

    def __init__(self) -> None:
        super().__init__()
        self.layer_class_to_replicate = GrowingLayer
