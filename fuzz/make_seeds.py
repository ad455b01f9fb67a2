#!/usr/bin/env python3
"""Writes seed inputs for the fuzz targets: well-formed virtio-blk requests (read, write, flush,
get-id, discard) in the layout the targets expect (8 config bytes, then guest memory)."""
import os
import struct

NEXT, WRITE = 1, 2


def seed(request_type, data_len, data_writable, event_idx=0):
    config = bytes([4, 0x00, 0x10, 0x20, event_idx, 0, 0, 0])  # 16 entries; desc 0x0, avail 0x1000, used 0x2000
    mem = bytearray(0x6000)
    descs = [(0x3000, 16, NEXT, 1)]
    if data_len:
        descs.append((0x4000, data_len, NEXT | (WRITE if data_writable else 0), 2))
    descs.append((0x5000, 1, WRITE, 0))
    for i, (addr, length, flags, nxt) in enumerate(descs):
        if i == len(descs) - 1:
            flags &= ~NEXT
        elif flags & NEXT:
            nxt = i + 1
        struct.pack_into("<QIHH", mem, 16 * i, addr, length, flags, nxt)
    struct.pack_into("<HHH", mem, 0x1000, 0, 1, 0)  # avail: flags, idx=1, ring[0]=0
    struct.pack_into("<IIQ", mem, 0x3000, request_type, 0, 1)
    struct.pack_into("<QII", mem, 0x4000, 2, 8, 0)  # a discard segment, if it is one
    return config + bytes(mem)


seeds = {"read": seed(0, 512, True), "write": seed(1, 512, False), "flush": seed(4, 0, False),
         "get_id": seed(8, 20, True), "discard": seed(11, 16, False), "read_event_idx": seed(0, 1024, True, 1)}
for target in ("blk_request", "virtqueue_walk"):
    os.makedirs(f"corpus/{target}", exist_ok=True)
    for name, data in seeds.items():
        with open(f"corpus/{target}/{name}", "wb") as f:
            f.write(data)
