#!/usr/bin/env python3
"""Network benchmark: TCP throughput guest-to-host and host-to-guest and UDP round-trip time,
measured by the test guest's init in user space, lkvm against QEMU microvm (virtio-net over
virtio-mmio), same kernel and initramfs, with the same backend:
- `--mode user`: lkvm's libslirp against QEMU's `-netdev user` (also libslirp); host-side
  servers listen on loopback only;
- `--mode tap` (root): a tap in a network namespace the benchmark creates, configured by the
  same script for both (QEMU `-netdev tap,vhost=off`: this lkvm has no vhost-net); servers
  listen inside the namespace.

Usage: bench/net.py [--mode user|tap] [--runs N] [--mib M]
"""
import argparse
import ctypes
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading

from common import GUEST, HOST_PARAMS, LKVM, LKVM_DEFAULTS, med, qemu_base, ratio_table, results, run

TESTS = ["guest_to_host", "host_to_guest", "udp_rtt"]


NETNS = f"lkvm-bench-{os.getpid()}"
TAP_SCRIPT = "#!/bin/sh\nip addr add 10.33.0.1/24 dev \"$1\" && ip link set \"$1\" up\n"
TAP_GUEST_IP = "ip=10.33.0.2::10.33.0.1:255.255.255.0::eth0:off"


def setns(path):
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path) as f:
        if libc.setns(f.fileno(), 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns {path}")


def servers(mib, bind="127.0.0.1"):
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
        listener.bind((bind, 0))
        listener.listen()
        ports.append(listener.getsockname()[1])
        threading.Thread(target=target, args=(listener,), daemon=True).start()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((bind, 0))
    ports.append(udp.getsockname()[1])
    threading.Thread(target=echo, args=(udp,), daemon=True).start()
    return ports


def value(v):
    """'12.3MB/s' or '450us' -> the number"""
    m = re.match(r"[0-9.]+", v or "")
    return float(m.group(0)) if m else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["user", "tap"], default="user")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--mib", type=int, default=64)
    args = ap.parse_args()
    kernel = ["-k", f"{GUEST}/vmlinux", "-i", f"{GUEST}/initramfs.cpio", "-m", "128", "-c", "1"]
    if args.mode == "user":
        sink, source, echo = servers(args.mib)
        # Each VMM's user-mode host address maps to the host loopback.
        bench = lambda host: f"{HOST_PARAMS} lkvm.netbench={host}:{sink}:{source}:{echo}:{args.mib}"
        vmms = {
            "lkvm": [LKVM, "run", *kernel, "--virtio-transport", "mmio", "-n", "mode=user,host_loopback=on",
                     "-p", f"ip=dhcp {bench('192.168.33.1')}"],
            "QEMU": qemu_base() + ["-netdev", "user,id=n0", "-device", "virtio-net-device,netdev=n0",
                                   "-append", f"{LKVM_DEFAULTS} ip=dhcp {bench('10.0.2.2')}"],
        }
    else:
        subprocess.run(["ip", "netns", "add", NETNS], check=True)
        home = "/proc/self/ns/net"
        own = open(home)
        setns(f"/run/netns/{NETNS}")
        sink, source, echo = servers(args.mib, bind="0.0.0.0")
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        setns(f"/proc/self/fd/{own.fileno()}")
        script = tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False)
        script.write(TAP_SCRIPT)
        script.close()
        os.chmod(script.name, 0o755)
        params = f"{HOST_PARAMS} {TAP_GUEST_IP} lkvm.netbench=10.33.0.1:{sink}:{source}:{echo}:{args.mib}"
        in_ns = ["ip", "netns", "exec", NETNS]
        vmms = {
            "lkvm": in_ns + [LKVM, "run", *kernel, "--virtio-transport", "mmio",
                             "-n", f"mode=tap,tapif=ltap0,script={script.name}", "-p", params],
            "QEMU": in_ns + qemu_base() + ["-netdev", f"tap,id=n0,ifname=qtap0,script={script.name},downscript=no,vhost=off",
                                           "-device", "virtio-net-device,netdev=n0",
                                           "-append", f"{LKVM_DEFAULTS} {params}"],
        }
    table = {name: {t: [] for t in TESTS} for name in vmms}
    try:
        for i in range(args.runs):
            for name, cmd in vmms.items():
                r = results(run(cmd)["lines"])
                for t in TESTS:
                    table[name][t].append(value(r.get(f"netbench:{t}")))
                print(f"run {i + 1} {name}: " + ", ".join(f"{t}={r.get('netbench:' + t)}" for t in TESTS), file=sys.stderr)
    finally:
        if args.mode == "tap":
            subprocess.run(["ip", "netns", "del", NETNS])
            os.unlink(script.name)
    backend = "user mode (libslirp in both)" if args.mode == "user" else "tap in a namespace (QEMU vhost=off)"
    print(f"\nNetwork benchmark, {backend}, virtio-mmio, {args.runs} runs, medians")
    units = ["MB/s", "MB/s", "us"]
    ratio_table([(f"{t} ({unit})", {name: med(table[name][t]) for name in vmms}) for t, unit in zip(TESTS, units)],
                list(vmms), "QEMU", digits=2)


if __name__ == "__main__":
    main()
