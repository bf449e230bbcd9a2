"""A byte-level tokenizer for small models trained from scratch (no vocabulary file needed).

ids: 0 = pad, 1 = eos, 2 = bos, 3 + b for each UTF-8 byte b; vocabulary size 259. Lossless:
`decode(encode(text)) == text` for any string.
"""

from __future__ import annotations

from typing import Iterable


class ByteTokenizer:
    pad_id, eos_id, bos_id = 0, 1, 2
    offset = 3
    vocab_size = 256 + offset
    name = "bytes-v1"

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode expects a str, got {type(text).__name__}")
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(int(i) - self.offset for i in ids if int(i) >= self.offset)
        return data.decode("utf-8", errors="replace")
