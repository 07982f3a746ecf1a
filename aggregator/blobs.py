"""Reading a chunked payload's tensors one module at a time, straight from the store.

A round over updates of hundreds of MB need not hold their payloads whole: FlexLoRA reads each module's
factors once per pass (a shape check, then the products), so the factors are loaded on access from the
chunks in the store, through a small cache of chunks, and dropped after use. Memory is then a few chunks
plus the module in hand, however large the update.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping

import torch

from aggregator.rounds import Blob, RoundStore, TransferGone
from schemas.errors import LoraLayoutError
from schemas.lora import LoraFactors, key_parts
from schemas.safetensors_stream import Entry, header_length, parse_header, tensor_from


class BlobReader:
    """Byte ranges of a stored payload, read chunk by chunk through an LRU cache of `cache_chunks`."""

    def __init__(self, store: RoundStore, blob: Blob, cache_chunks: int = 3) -> None:
        self.store, self.blob = store, blob
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_chunks = cache_chunks
        self.chunk_bytes = len(self._chunk(0))

    def _chunk(self, index: int) -> bytes:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        chunk = self.store.read_chunk(self.blob, index)
        if chunk is None:
            raise TransferGone(f"payload {self.blob.key} has no chunk {index}")
        self._cache[index] = chunk
        while len(self._cache) > self._cache_chunks:
            self._cache.popitem(last=False)
        return chunk

    def read(self, begin: int, end: int) -> bytearray:
        out = bytearray(end - begin)
        at = begin
        while at < end:
            index, offset = divmod(at, self.chunk_bytes)
            piece = self._chunk(index)[offset : offset + (end - at)]
            if not piece:
                raise TransferGone(f"payload {self.blob.key} ends before byte {end}")
            out[at - begin : at - begin + len(piece)] = piece
            at += len(piece)
        return out


class LazyFactors(Mapping[str, LoraFactors]):
    """A chunked update's LoRA factors by module, each read from the store when asked for (not kept)."""

    def __init__(self, store: RoundStore, blob: Blob) -> None:
        self.reader = BlobReader(store, blob)
        n = header_length(self.reader.read(0, 8), blob.size)
        self._data_start = 8 + n
        entries = parse_header(self.reader.read(8, 8 + n), blob.size - 8 - n)
        modules: dict[str, dict[str, Entry]] = {}
        for entry in entries:
            parts = key_parts(entry.name)
            if parts is None:
                raise LoraLayoutError(f"unexpected tensor key {entry.name!r} in a recorded payload")
            modules.setdefault(parts[0], {})[parts[1]] = entry
        self._modules = {m: (f["A"], f["B"]) for m, f in sorted(modules.items()) if set(f) == {"A", "B"}}

    def _load(self, entry: Entry) -> torch.Tensor:
        start = self._data_start
        return tensor_from(entry, self.reader.read(start + entry.begin, start + entry.end))

    def __getitem__(self, module: str) -> LoraFactors:
        a, b = self._modules[module]
        return LoraFactors(self._load(a), self._load(b))

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)
