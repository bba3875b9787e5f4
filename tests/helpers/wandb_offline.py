"""Read an offline W&B run (``run-*.wandb``) without a server: the file is a LevelDB-style record log
(7-byte header ``:W&B`` + magic + version, 32 KiB blocks, records of crc32c(4) + length(2) + type(1) + data,
type 1 = full, 2/3/4 = first/middle/last fragment) of ``wandb_internal_pb2.Record`` protobufs."""

from __future__ import annotations

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7


def read_records(path: str | Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # block trailer too small for a header: skip to next block
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def summarise(path: str | Path) -> dict:
    """Metric keys logged to history, the run's group and tags."""
    keys, group, tags = set(), None, []
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            keys |= {item.key or item.nested_key[0] for item in record.history.item}  # media: (key, field)
        elif kind == "run":
            group, tags = record.run.run_group, list(record.run.tags)
    return {"keys": keys, "group": group, "tags": tags}
