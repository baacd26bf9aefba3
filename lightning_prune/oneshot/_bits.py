"""Keep-masks held one bit per weight while the runner prunes, unpacked into the returned ``MaskSet`` at the end.

A bool mask takes one byte per weight (a quarter of a float32 model); packed, an eighth of that. Packing and
unpacking go through chunks of :data:`_CHUNK` entries, so their temporaries stay small.

Example:
    >>> import torch
    >>> keep = torch.tensor([[True, False, True], [False, False, True]])
    >>> bits = PackedMask(keep)
    >>> out = torch.empty(2, 3, dtype=torch.bool)
    >>> bits.unpack_into(out)
    >>> torch.equal(out, keep), bits.nbytes
    (True, 1)
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Entries packed or unpacked at once (a multiple of 8).
_CHUNK = 1 << 23
#: Multiplying eight bytes that are 0 or 1 (an int64) by this gathers byte ``j`` into bit ``56 + j``.
_GATHER = 0x0102040810204080


def _weights(device: torch.device) -> Tensor:
    return torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)


class PackedMask:
    """A bool tensor held as one bit per entry (``ceil(numel / 8)`` bytes), in its row-major order."""

    def __init__(self, mask: Tensor) -> None:
        flat = mask.reshape(-1).view(torch.uint8)  # a copy only when `mask` is not contiguous
        if flat.storage_offset() % 8:  # read as int64 below
            flat = flat.clone()
        self.shape = tuple(mask.shape)
        self.numel = flat.numel()
        self.bits = torch.empty((self.numel + 7) // 8, dtype=torch.uint8, device=mask.device)
        for start in range(0, self.numel, _CHUNK):
            part = flat[start : start + _CHUNK]
            if part.numel() % 8:
                part = torch.cat([part, part.new_zeros(8 - part.numel() % 8)])
            # Eight 0/1 bytes read as one (little-endian) int64, times _GATHER: byte j lands on bit 56 + j.
            gathered = part.view(torch.int64).mul(_GATHER).bitwise_right_shift_(56).bitwise_and_(255)
            self.bits[start // 8 :][: gathered.numel()] = gathered

    @property
    def nbytes(self) -> int:
        return self.bits.numel()

    def unpack_into(self, out: Tensor) -> None:
        """Write the mask into the contiguous bool tensor ``out`` (of the packed mask's number of entries)."""
        flat = out.view(-1)
        weights = _weights(self.bits.device)
        for start in range(0, self.numel, _CHUNK):
            stop = min(start + _CHUNK, self.numel)
            bytes_ = self.bits[start // 8 : (stop + 7) // 8]
            unpacked = (bytes_.unsqueeze(1) & weights).ne_(0).view(-1)
            flat[start:stop] = unpacked[: stop - start]
