#!/usr/bin/env python3
"""vsock benchmark: throughput guest-to-host and host-to-guest and connect latency over lkvm's
virtio-vsock (host programs on its UNIX sockets, Firecracker's protocol), side by side with TCP
over user-mode networking in the same boot (lkvm's libslirp), and TCP over QEMU's user-mode
networking with the same kernel and initramfs. This host has no /dev/vhost-vsock, so QEMU's
vhost-vsock cannot be measured here; with `--firecracker PATH` Firecracker's vsock is measured
too (its API, the same guest, the same host programs).

Usage: bench/vsock.py [--runs N] [--mib M] [--firecracker PATH]
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

from common import GUEST, HOST_PARAMS, LKVM, LKVM_DEFAULTS, med, qemu_base, ratio_table, results, run
from net import servers

PORT = 6000


def vsock_servers(uds, mib):
    """Host programs the guest connects to: a sink on PORT, a source on PORT+1, and one that
    closes at once on PORT+2."""
    def serve(port, handle):
        path = f"{uds}_{port}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(64)

        def loop():
            while True:
                conn, _ = listener.accept()
                threading.Thread(target=handle, args=(conn,), daemon=True).start()
        threading.Thread(target=loop, daemon=True).start()

    def sink(conn):
        while conn.recv(1 << 16):
            pass
        conn.close()

    def source(conn):
        chunk = b"\x5a" * (1 << 16)
        for _ in range((mib << 20) // len(chunk)):
            conn.sendall(chunk)
        conn.close()

    serve(PORT, sink)
    serve(PORT + 1, source)
    serve(PORT + 2, lambda conn: conn.close())


def value(text):
    try:
        return float(text.rstrip("MB/s").rstrip("us"))
    except (AttributeError, ValueError):
        return None


def firecracker_cmd(binary, workdir, uds, params):
    config = {
        "boot-source": {"kernel_image_path": f"{GUEST}/vmlinux", "initrd_path": f"{GUEST}/initramfs.cpio",
                        "boot_args": f"{LKVM_DEFAULTS} {params}"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "drives": [],
        "vsock": {"guest_cid": 3, "uds_path": uds},
    }
    path = os.path.join(workdir, "fc.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return [binary, "--no-api", "--config-file", path]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=8)
    parser.add_argument("--firecracker")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="lkvm-bench-vsock-")
    kernel = ["-k", f"{GUEST}/vmlinux", "-i", f"{GUEST}/initramfs.cpio", "-m", "128", "-c", "1"]
    sink, source, echo = servers(args.mib)
    tcp = lambda host: f"lkvm.netbench={host}:{sink}:{source}:{echo}:{args.mib}"
    vsock = f"lkvm.vsockbench={PORT}:{args.mib}"
    vmms = {}
    uds = {}
    for name in ["lkvm", "Firecracker"] if args.firecracker else ["lkvm"]:
        uds[name] = os.path.join(workdir, f"{name}.vsock")
        vsock_servers(uds[name], args.mib)
    vmms["lkvm"] = [LKVM, "run", *kernel, "--virtio-transport", "mmio", "-n", "mode=user,host_loopback=on",
                    "--vsock", f"3,uds={uds['lkvm']}", "-p", f"{HOST_PARAMS} ip=dhcp {vsock} {tcp('192.168.33.1')}"]
    vmms["QEMU"] = qemu_base() + ["-netdev", "user,id=n0", "-device", "virtio-net-device,netdev=n0",
                                  "-append", f"{LKVM_DEFAULTS} {HOST_PARAMS} ip=dhcp {tcp('10.0.2.2')}"]
    if args.firecracker:
        vmms["Firecracker"] = firecracker_cmd(args.firecracker, workdir, uds["Firecracker"], f"{HOST_PARAMS} {vsock}")
    rows = {
        "vsock guest->host (MB/s)": ("vsockbench:guest_to_host", ["lkvm", "Firecracker"]),
        "vsock host->guest (MB/s)": ("vsockbench:host_to_guest", ["lkvm", "Firecracker"]),
        "vsock connect (us)": ("vsockbench:connect", ["lkvm", "Firecracker"]),
        "TCP user-mode guest->host (MB/s)": ("netbench:guest_to_host", ["lkvm", "QEMU"]),
        "TCP user-mode host->guest (MB/s)": ("netbench:host_to_guest", ["lkvm", "QEMU"]),
    }
    table = {row: {name: [] for name in vmms} for row in rows}
    for i in range(args.runs):
        for name, cmd in vmms.items():
            r = results(run(cmd)["lines"])
            for row, (key, who) in rows.items():
                if name in who:
                    table[row][name].append(value(r.get(key)))
            print(f"run {i + 1} {name}: " + ", ".join(f"{k}={r.get(k)}" for k, _ in rows.values() if r.get(k)),
                  file=sys.stderr)
    print(f"\nvsock benchmark, virtio-mmio, 1 vCPU, {args.mib} MiB each way, {args.runs} runs, medians")
    print("(TCP rows: user-mode networking, the fallback comparison; this host has no vhost-vsock)")
    columns = list(vmms)
    ratio_table([(row, {name: med([v for v in table[row][name] if v is not None]) for name in columns})
                 for row in rows], columns, "lkvm", digits=2)


if __name__ == "__main__":
    main()
