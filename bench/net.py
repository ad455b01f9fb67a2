#!/usr/bin/env python3
"""Network benchmark: TCP throughput guest-to-host and host-to-guest and UDP round-trip time,
measured by the test guest's init in user space, lkvm against QEMU microvm (virtio-net over
virtio-mmio), both in user mode (lkvm's libslirp against QEMU's libslirp), same kernel and
initramfs. Host-side servers listen on loopback only.

Usage: bench/net.py [--runs N] [--mib M]
"""
import argparse
import re
import socket
import sys
import threading

from common import GUEST, HOST_PARAMS, LKVM, LKVM_DEFAULTS, med, qemu_base, results, run

TESTS = ["guest_to_host", "host_to_guest", "udp_rtt"]


def servers(mib):
    def sink(listener):
        while True:
            conn, _ = listener.accept()
            while conn.recv(1 << 16):
                pass
            conn.close()

    def source(listener):
        block = b"\x5a" * (1 << 16)
        while True:
            conn, _ = listener.accept()
            try:
                for _ in range((mib << 20) // len(block)):
                    conn.sendall(block)
            except OSError:
                pass
            conn.close()

    def echo(sock):
        while True:
            data, peer = sock.recvfrom(64)
            sock.sendto(data, peer)

    ports = []
    for target in (sink, source):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        ports.append(listener.getsockname()[1])
        threading.Thread(target=target, args=(listener,), daemon=True).start()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    ports.append(udp.getsockname()[1])
    threading.Thread(target=echo, args=(udp,), daemon=True).start()
    return ports


def value(v):
    """'12.3MB/s' or '450us' -> the number"""
    m = re.match(r"[0-9.]+", v or "")
    return float(m.group(0)) if m else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--mib", type=int, default=64)
    args = ap.parse_args()
    sink, source, echo = servers(args.mib)
    # Each VMM's user-mode host address maps to the host loopback.
    bench = lambda host: f"{HOST_PARAMS} lkvm.netbench={host}:{sink}:{source}:{echo}:{args.mib}"
    vmms = {
        "lkvm": [LKVM, "run", "-k", f"{GUEST}/vmlinux", "-i", f"{GUEST}/initramfs.cpio", "-m", "128", "-c", "1",
                 "--virtio-transport", "mmio", "-n", "mode=user", "-p", bench("192.168.33.1")],
        "QEMU": qemu_base() + ["-netdev", "user,id=n0", "-device", "virtio-net-device,netdev=n0",
                               "-append", f"{LKVM_DEFAULTS} ip=dhcp {bench('10.0.2.2')}"],
    }
    table = {name: {t: [] for t in TESTS} for name in vmms}
    for i in range(args.runs):
        for name, cmd in vmms.items():
            r = results(run(cmd)["lines"])
            for t in TESTS:
                table[name][t].append(value(r.get(f"netbench:{t}")))
            print(f"run {i + 1} {name}: " + ", ".join(f"{t}={r.get('netbench:' + t)}" for t in TESTS), file=sys.stderr)
    print(f"\nNetwork benchmark, user mode (libslirp in both), virtio-mmio, {args.runs} runs, medians")
    print("| test | lkvm | QEMU | lkvm / QEMU |")
    print("|---|---|---|---|")
    for t, unit in zip(TESTS, ["MB/s", "MB/s", "us"]):
        a, b = med(table["lkvm"][t]), med(table["QEMU"][t])
        ratio = f"{a / b:.2f}" if a and b else "-"
        print(f"| {t} ({unit}) | {a if a is None else round(a, 1)} | {b if b is None else round(b, 1)} | {ratio} |")


if __name__ == "__main__":
    main()
