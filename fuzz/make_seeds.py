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
for target in ("blk_request", "virtqueue_walk", "net_rx"):
    os.makedirs(f"corpus/{target}", exist_ok=True)
    for name, data in seeds.items():
        with open(f"corpus/{target}/{name}", "wb") as f:
            f.write(data)


def p9(kind, body):
    return struct.pack("<IBH", len(body) + 7, kind, 0) + body


def s(text):
    return struct.pack("<H", len(text)) + text.encode()


walk = lambda fid, new, *names: p9(110, struct.pack("<IIH", fid, new, len(names)) + b"".join(s(n) for n in names))
p9_seeds = {
    "read": walk(0, 1, "file") + p9(12, struct.pack("<II", 1, 0)) + p9(116, struct.pack("<IQI", 1, 0, 64)),
    "create_write": walk(0, 1) + p9(14, struct.pack("<I", 1) + s("new") + struct.pack("<III", 2, 0o644, 0))
    + p9(118, struct.pack("<IQI", 1, 0, 4) + b"data") + p9(50, struct.pack("<II", 1, 0)),
    "mkdir_rename_unlink": p9(72, struct.pack("<I", 0) + s("d2") + struct.pack("<II", 0o755, 0))
    + p9(74, struct.pack("<I", 0) + s("d2") + struct.pack("<I", 0) + s("d3"))
    + p9(76, struct.pack("<I", 0) + s("d3") + struct.pack("<I", 0x200)),
    "readdir": walk(0, 1, "dir") + p9(12, struct.pack("<II", 1, 0o200000)) + p9(40, struct.pack("<IQI", 1, 0, 4096)),
    "symlinks": walk(0, 1, "up", "secret") + walk(0, 2, "abs") + p9(12, struct.pack("<II", 2, 2))
    + p9(22, struct.pack("<I", 2)),
    "symlink_mknod": walk(0, 1, "dir") + p9(16, struct.pack("<I", 1) + s("ln") + s("../up") + struct.pack("<I", 0))
    + p9(18, struct.pack("<I", 1) + s("fifo") + struct.pack("<IIII", 0o10644, 0, 0, 0))
    + p9(74, struct.pack("<I", 0) + s("dir") + struct.pack("<I", 0) + s("dir2"))
    + p9(16, struct.pack("<I", 1) + s("ln2") + s("/") + struct.pack("<I", 0)),
    "setattr_link": walk(0, 1, "file") + p9(26, struct.pack("<IIIIIQQQQQ", 1, 9, 0o4755, 0, 0, 3, 0, 0, 0, 0))
    + p9(70, struct.pack("<II", 0, 1) + s("hard")) + p9(8, struct.pack("<I", 0)) + p9(24, struct.pack("<IQ", 1, 0x7FF)),
    # Down the deep tree (long fid paths), then back up past the share through its symlink.
    "deep": walk(0, 1, *"deeptreesaredeep") + walk(1, 2, "up", "outside", "secret") + p9(12, struct.pack("<II", 2, 0))
    + p9(116, struct.pack("<IQI", 2, 0, 64)) + walk(1, 3, "..", "..") + p9(40, struct.pack("<IQI", 3, 0, 4096)),
    # The outside file's owner, mode and times, asked to change through the absolute symlink.
    "setattr_outside": walk(0, 1, "abs") + p9(26, struct.pack("<IIIIIQQQQQ", 1, 0x7F, 0o777, 1, 1, 0, 1, 0, 1, 0)),
}
os.makedirs("corpus/p9_message", exist_ok=True)
for name, data in p9_seeds.items():
    for read_only in (0, 1):
        with open(f"corpus/p9_message/{name}_{read_only}", "wb") as f:
            f.write(bytes([read_only]) + data)
