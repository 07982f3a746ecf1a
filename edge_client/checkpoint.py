"""A device's progress on disk: its adapter, the global version it holds, and an update not yet answered.

A restarted device continues from here: it reloads its adapter and re-sends the same unanswered update
(same update id, so the aggregators count it once) instead of training a new one. Tensors are
safetensors, metadata JSON; every file is written to a temporary name and renamed, so a crash never
leaves half a checkpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from schemas.messages import LoraUpdate
from schemas.tensors import decode_tensors, encode_tensors

ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "state.json"
PENDING_HEADER = "pending-update.json"
PENDING_PAYLOAD = "pending-update.safetensors"


@dataclass(frozen=True)
class Checkpoint:
    version: int
    rounds_done: int
    adapter: dict[str, torch.Tensor] | None
    pending: tuple[LoraUpdate, bytes] | None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


class CheckpointStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def save_adapter(self, version: int, rounds_done: int, adapter: dict[str, torch.Tensor]) -> None:
        """After an adapter is loaded: it replaces the local adapter and answers the pending update."""
        self.directory.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.directory / ADAPTER_FILE, encode_tensors(adapter)[0])
        _write_atomic(
            self.directory / STATE_FILE, json.dumps({"version": version, "rounds_done": rounds_done}).encode()
        )
        self.clear_pending()

    def save_pending(self, header: LoraUpdate, payload: bytes) -> None:
        """Before an update is sent, so a crash between sending and its answer re-sends the same one."""
        self.directory.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.directory / PENDING_PAYLOAD, payload)
        _write_atomic(self.directory / PENDING_HEADER, header.model_dump_json().encode())

    def clear_pending(self) -> None:
        for name in (PENDING_HEADER, PENDING_PAYLOAD):
            (self.directory / name).unlink(missing_ok=True)

    def load(self) -> Checkpoint | None:
        state_file = self.directory / STATE_FILE
        header_file = self.directory / PENDING_HEADER
        if not state_file.is_file() and not header_file.is_file():
            return None
        state = json.loads(state_file.read_text()) if state_file.is_file() else {"version": 0, "rounds_done": 0}
        adapter_file = self.directory / ADAPTER_FILE
        adapter = decode_tensors(adapter_file.read_bytes()) if adapter_file.is_file() else None
        pending = None
        if header_file.is_file() and (self.directory / PENDING_PAYLOAD).is_file():
            header = LoraUpdate.model_validate_json(header_file.read_text())
            payload = (self.directory / PENDING_PAYLOAD).read_bytes()
            decode_tensors(payload, header.payload)  # a torn or foreign file fails here, loudly
            pending = (header, payload)
        return Checkpoint(int(state["version"]), int(state["rounds_done"]), adapter, pending)
