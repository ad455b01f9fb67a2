#!/usr/bin/env python3
"""Firecracker's API, lkvm against Firecracker, side by side in one run (alternating):
process start -> API socket accepting (wall and CPU time), and InstanceStart -> the guest's
first instruction (the first byte its tiny 64-bit ELF kernel prints on COM1), then the guest
resets through the i8042 and the process exits.

    bench/api.py --runs 20 [--firecracker PATH]

lkvm runs as `firecracker` (a symlink to target/x86_64-unknown-linux-gnu/release/lkvm). Firecracker is not built by this
project: build it from its own repository and pass its binary with --firecracker."""
import argparse
import http.client
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import LKVM  # noqa: E402


def elf_kernel(code):
    """A minimal ELF64 executable loaded at 1 MiB, entered in long mode at its first byte."""
    load, headers = 0x100000, 64 + 56
    elf = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    elf += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, load, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    elf += struct.pack("<IIQQQQQQ", 1, 5, headers, load, load, len(code), len(code), 0x1000)
    return elf + code


# mov edx, 0x3f8; mov al, 'X'; out dx, al; mov al, 0xfe; out 0x64, al; hlt; jmp hlt
PAYLOAD = elf_kernel(bytes([0xba, 0xf8, 0x03, 0, 0, 0xb0, ord("X"), 0xee, 0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd]))


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=None):
        super().__init__("localhost")
        self.path, self.unix_timeout = path, timeout

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.unix_timeout)
        self.sock.connect(self.path)


def request(sock_path, method, path, body):
    conn = UnixHTTPConnection(sock_path)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    if response.status >= 300:
        raise RuntimeError(f"{method} {path}: {response.status} {data!r}")


def cpu_ms(pid):
    """CPU time of every thread of `pid` so far, from schedstat (nanoseconds)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / 1e6


def one_run(binary, workdir, kernel):
    sock_path = os.path.join(workdir, "api.sock")
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    start = time.monotonic()
    proc = subprocess.Popen([binary, "--api-sock", sock_path], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=workdir)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    while True:
        try:
            probe.connect(sock_path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() - start > 10:
                proc.kill()
                raise RuntimeError(f"{binary}: no API socket after 10 s")
            time.sleep(0.0002)
    to_socket = (time.monotonic() - start) * 1000
    socket_cpu = cpu_ms(proc.pid)
    probe.close()
    request(sock_path, "PUT", "/boot-source", f'{{"kernel_image_path": "{kernel}", "boot_args": "console=ttyS0"}}')
    request(sock_path, "PUT", "/machine-config", '{"vcpu_count": 1, "mem_size_mib": 32}')
    sent = time.monotonic()
    request(sock_path, "PUT", "/actions", '{"action_type": "InstanceStart"}')
    answered = (time.monotonic() - sent) * 1000
    fd = proc.stdout.fileno()
    first = None
    while first is None:
        ready, _, _ = select.select([fd], [], [], 10)
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        if b"X" in chunk:
            first = (time.monotonic() - sent) * 1000
    proc.wait(timeout=10)
    return {"socket_ms": to_socket, "socket_cpu_ms": socket_cpu, "start_answer_ms": answered, "first_insn_ms": first}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--firecracker", help="a Firecracker binary built from its repository")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="lkvm-api-bench-")
    kernel = os.path.join(workdir, "payload.elf")
    with open(kernel, "wb") as f:
        f.write(PAYLOAD)
    link = os.path.join(workdir, "firecracker")
    os.symlink(LKVM, link)
    vmms = {"lkvm": link}
    if args.firecracker:
        vmms["firecracker"] = os.path.abspath(args.firecracker)
    samples = {name: [] for name in vmms}
    for _ in range(args.runs):
        for name, binary in vmms.items():
            samples[name].append(one_run(binary, workdir, kernel))
    metrics = [("start to API socket, wall (ms)", "socket_ms"), ("start to API socket, CPU (ms)", "socket_cpu_ms"),
               ("InstanceStart answered (ms)", "start_answer_ms"), ("InstanceStart to first guest output (ms)", "first_insn_ms")]
    print_medians(args.runs, samples, metrics)


def print_medians(runs, samples, metrics, scales=None):
    """A markdown table of each metric's median per VMM, and lkvm's ratio to Firecracker's.
    `samples`: VMM name -> list of dicts; `metrics`: (label, key); `scales`: key -> factor."""
    names = list(samples)
    print(f"medians of {runs} alternating runs")
    print("| metric | " + " | ".join(names) + (" | lkvm / firecracker |" if len(names) > 1 else " |"))
    print("|---" * (len(names) + 1 + (len(names) > 1)) + "|")
    for label, key in metrics:
        scale = (scales or {}).get(key, 1)
        values = {n: [s[key] * scale for s in samples[n] if s[key] is not None] for n in names}
        medians = [statistics.median(values[n] or [float("nan")]) for n in names]
        cells = [f"{m:.2f}" for m in medians]
        if len(names) > 1:
            cells.append(f"{medians[0] / medians[1]:.2f}")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
