"""Reading a W&B run file (run-ID.wandb) back with wandb's own record type.

wandb 0.31 writes runs with its Go core and ships no Python reader, so this reads the
file's framing (a LevelDB-style log: a 7-byte ':W&B' header, then 32 KiB blocks of records
with a 7-byte header each: crc32, length, kind) and decodes every record with
wandb.proto.wandb_internal_pb2.Record, the protobuf message wandb itself writes.
"""

import glob
import json
import os
import struct

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str) -> list:
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    payloads, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        pos += HEADER
        payload, pos = data[pos:pos + length], pos + length
        if kind == FULL:
            payloads.append(payload)
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            payloads.append(pending + payload)
        elif kind == 0 and length == 0:  # zero padding to the block's end
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
    return [wandb_internal_pb2.Record.FromString(p) for p in payloads]


def offline_run(run_dir: str) -> dict:
    """The offline run under run_dir/wandb: its id, config, tags and history rows."""
    files = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1, files
    run = {"file": files[0], "config": {}, "history": [], "tags": []}
    for record in read_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"] = record.run.run_id
            run["tags"] = list(record.run.tags)
            run["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            run["history"].append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                   for i in record.history.item})
    return run
