#!/usr/bin/env python3
"""Writes an uncompressed newc cpio archive from a list of entries, without needing root for
device nodes. Each argument is one entry:
  dir:PATH  file:PATH=HOSTFILE  link:PATH=TARGET  char:PATH=MAJOR,MINOR
"""
import os
import stat
import sys


def header(ino, mode, size, name, rdev=(0, 0), nlink=1):
    fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
    return b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"


def pad(buf):
    return buf + b"\0" * (-len(buf) % 4)


def main(out_path, entries):
    out = bytearray()
    for ino, entry in enumerate(entries, start=1):
        kind, _, spec = entry.partition(":")
        path, _, arg = spec.partition("=")
        path = path.lstrip("/")
        if kind == "dir":
            out += pad(header(ino, stat.S_IFDIR | 0o755, 0, path, nlink=2))
        elif kind == "file":
            data = open(arg, "rb").read()
            mode = 0o755 if os.access(arg, os.X_OK) else 0o644
            out += pad(header(ino, stat.S_IFREG | mode, len(data), path)) + pad(data)
        elif kind == "link":
            out += pad(header(ino, stat.S_IFLNK | 0o777, len(arg), path)) + pad(arg.encode())
        elif kind == "char":
            major, minor = (int(x) for x in arg.split(","))
            out += pad(header(ino, stat.S_IFCHR | 0o600, 0, path, rdev=(major, minor)))
        else:
            sys.exit(f"mkcpio: unknown entry kind in {entry!r}")
    out += pad(header(0, 0, 0, "TRAILER!!!"))
    with open(out_path, "wb") as f:
        f.write(out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
