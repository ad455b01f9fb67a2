#!/usr/bin/env python3
"""Snapshots through Firecracker's API, lkvm against Firecracker, side by side in one run: for
each guest size, each VMM boots the test guest (its init runs a workload that prints a line
every 200 ms), pauses it and snapshots it (create time, file sizes); then restores it in fresh
processes, alternating between the VMMs: `PUT /snapshot/load` latency, and process start to the
guest echoing a line typed on its console right after the load (the guest running again).

    bench/snapshot.py [--restores 10] [--sizes 128,1024] [--firecracker PATH]

lkvm runs as `firecracker` (a symlink to target/x86_64-unknown-linux-gnu/release/lkvm). Firecracker is not built by this
project: build it from its own repository and pass its binary with --firecracker."""
import argparse
import json
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from api import request  # noqa: E402
from common import GUEST, HOST_PARAMS, LKVM  # noqa: E402

BOOT_TIMEOUT = 1500


class Vmm:
    """One VMM process with an API socket and its console output read line by line."""

    def __init__(self, binary, workdir, name):
        self.sock = os.path.join(workdir, f"{name}.sock")
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.started = time.monotonic()
        self.proc = subprocess.Popen([binary, "--api-sock", self.sock, "--id", name], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=workdir)
        self.pending = b""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                probe.connect(self.sock)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() - self.started > 10:
                    self.proc.kill()
                    raise RuntimeError(f"{binary}: no API socket after 10 s")
                time.sleep(0.0002)
        probe.close()

    def api(self, method, path, body=None):
        sent = time.monotonic()
        request(self.sock, method, path, json.dumps(body) if body is not None else None)
        return (time.monotonic() - sent) * 1000

    def wait_line(self, prefix, timeout):
        """Seconds since the process started when a console line starting with `prefix` came."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while time.monotonic() < deadline:
            while b"\n" in self.pending:
                line, self.pending = self.pending.split(b"\n", 1)
                if line.strip().startswith(prefix):
                    return time.monotonic() - self.started
            ready, _, _ = select.select([fd], [], [], 1)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self.pending += chunk
        raise RuntimeError(f"no {prefix!r} line within {timeout} s")

    def end(self):
        self.proc.kill()
        self.proc.wait()


def boot_working(binary, workdir, name, mem_mib, vcpus):
    """Boots the guest through the API and waits until its workload runs."""
    vm = Vmm(binary, workdir, name)
    args = f"console=ttyS0 reboot=k panic=1 {HOST_PARAMS} lkvm.snapwork=100000"
    vm.api("PUT", "/boot-source", {"kernel_image_path": os.path.join(GUEST, "vmlinux"),
                                   "initrd_path": os.path.join(GUEST, "initramfs.cpio"), "boot_args": args})
    vm.api("PUT", "/machine-config", {"vcpu_count": vcpus, "mem_size_mib": mem_mib})
    vm.api("PUT", "/actions", {"action_type": "InstanceStart"})
    vm.wait_line(b"LKVM-WORK", BOOT_TIMEOUT)
    return vm


def snapshot(binary, workdir, name, mem_mib):
    """Boots the guest, lets the workload start, pauses and snapshots it; returns the files."""
    vm = boot_working(binary, workdir, name, mem_mib, 2)
    vm.api("PATCH", "/vm", {"state": "Paused"})
    state, memory = os.path.join(workdir, f"{name}.state"), os.path.join(workdir, f"{name}.mem")
    create_ms = vm.api("PUT", "/snapshot/create", {"snapshot_path": state, "mem_file_path": memory})
    vm.end()
    return {"state": state, "memory": memory, "create_ms": create_ms, "state_kib": os.path.getsize(state) / 1024,
            "memory_on_disk_mib": os.stat(memory).st_blocks * 512 / (1 << 20)}


def restore(binary, workdir, snap):
    vm = Vmm(binary, workdir, "restored")
    load_ms = vm.api("PUT", "/snapshot/load", {"snapshot_path": snap["state"], "resume_vm": True,
                                               "mem_backend": {"backend_type": "File", "backend_path": snap["memory"]}})
    # The guest answers console input at once, where its own output follows its timers.
    vm.proc.stdin.write(b"ping\n")
    vm.proc.stdin.flush()
    running_ms = vm.wait_line(b"LKVM-RESULT echo=ping", 60) * 1000
    vm.end()
    return {"load_ms": load_ms, "running_ms": running_ms}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--restores", type=int, default=10)
    parser.add_argument("--sizes", default="128,1024", help="guest sizes in MiB")
    parser.add_argument("--firecracker", help="a Firecracker binary built from its repository")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="lkvm-snapshot-bench-")
    link = os.path.join(workdir, "firecracker")
    os.symlink(LKVM, link)
    vmms = {"lkvm": link}
    if args.firecracker:
        vmms["firecracker"] = os.path.abspath(args.firecracker)
    names = list(vmms)
    print(f"medians of {args.restores} alternating restores per size; 2 vCPUs")
    print("| guest | metric | " + " | ".join(names) + (" | lkvm / firecracker |" if len(names) > 1 else " |"))
    print("|---" * (len(names) + 2 + (len(names) > 1)) + "|")
    for mem_mib in [int(s) for s in args.sizes.split(",")]:
        snaps = {name: snapshot(binary, workdir, f"{name}-{mem_mib}", mem_mib) for name, binary in vmms.items()}
        samples = {name: [] for name in names}
        for _ in range(args.restores):
            for name in names:
                samples[name].append(restore(vmms[name], workdir, snaps[name]))
        rows = [("PUT /snapshot/load answered (ms)", [statistics.median(s["load_ms"] for s in samples[n]) for n in names]),
                ("process start to guest running (ms)",
                 [statistics.median(s["running_ms"] for s in samples[n]) for n in names]),
                ("snapshot create (ms)", [snaps[n]["create_ms"] for n in names]),
                ("state file (KiB)", [snaps[n]["state_kib"] for n in names]),
                ("memory file on disk (MiB)", [snaps[n]["memory_on_disk_mib"] for n in names])]
        for label, values in rows:
            cells = [f"{v:.1f}" for v in values]
            if len(names) > 1:
                cells.append(f"{values[0] / values[1]:.2f}")
            print(f"| {mem_mib} MiB | {label} | " + " | ".join(cells) + " |")
        for snap in snaps.values():
            os.unlink(snap["memory"])
    shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
