#!/usr/bin/env python3
"""Sends the same API requests to lkvm (as `firecracker`) and to a real Firecracker, and prints
where their answers differ (status, body): requests before start, then on a running guest (a
tiny ELF kernel that spins).

    scripts/fc_api_diff.py --firecracker PATH [--lkvm PATH]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from api import UnixHTTPConnection, elf_kernel  # noqa: E402

# (method, path, body): bodies are JSON text, sent as they are.
REQUESTS = [
    ("GET", "/", None),
    ("GET", "/machine-config", None),
    ("GET", "/version", None),
    ("GET", "/mmds", None),
    ("GET", "/balloon", None),
    ("GET", "/balloon/statistics", None),
    ("GET", "/nonsense", None),
    ("DELETE", "/", None),
    ("PUT", "/machine-config", '{"vcpu_count": 1}'),
    ("PUT", "/machine-config", '{"vcpu_count": 99, "mem_size_mib": 128}'),
    ("PUT", "/machine-config", '{"vcpu_count": 0, "mem_size_mib": 128}'),
    ("PUT", "/machine-config", '{"vcpu_count": 1, "mem_size_mib": 128, "smt": true}'),
    ("PATCH", "/machine-config", '{"mem_size_mib": 64}'),
    ("PUT", "/boot-source", '{"kernel_image_path": "/nonexistent/vmlinux"}'),
    ("PUT", "/boot-source", '{"kernel_image_path": '),
    ("PUT", "/boot-source", '{"kernel": "/k"}'),
    ("PUT", "/drives/rootfs", '{"drive_id": "rootfs", "path_on_host": "/nonexistent/disk.img", "is_root_device": true}'),
    ("PUT", "/drives/a", '{"drive_id": "b", "path_on_host": "/dev/null", "is_root_device": false}'),
    ("PUT", "/network-interfaces/eth0", '{"iface_id": "eth0", "host_dev_name": "no-such-tap-device-x"}'),
    ("PUT", "/network-interfaces/eth0", '{"iface_id": "eth1", "host_dev_name": "tap0"}'),
    ("PUT", "/vsock", '{"guest_cid": 2, "uds_path": "/tmp/x.vsock"}'),
    ("PUT", "/mmds/config", '{"network_interfaces": ["eth0"]}'),
    ("PUT", "/mmds/config", '{"network_interfaces": []}'),
    ("PUT", "/mmds", '{"latest": {"meta-data": {"ami-id": "ami-1"}}}'),
    ("PATCH", "/mmds", '{"latest": {"meta-data": {"ami-id": null}}}'),
    ("GET", "/mmds", None),
    ("PUT", "/mmds", '[1, 2]'),
    ("PUT", "/balloon", '{"amount_mib": 0, "deflate_on_oom": false}'),
    ("PATCH", "/balloon", '{"amount_mib": 1}'),
    ("PATCH", "/balloon/statistics", '{"stats_polling_interval_s": 1}'),
    ("PUT", "/logger", '{"level": "Loud"}'),
    ("PUT", "/logger", '{"log_path": "/nonexistent/dir/log"}'),
    ("PUT", "/metrics", '{"metrics_path": "/nonexistent/dir/metrics"}'),
    ("PUT", "/entropy", '{}'),
    ("PUT", "/actions", '{"action_type": "FlushMetrics"}'),
    ("PUT", "/actions", '{"action_type": "SendCtrlAltDel"}'),
    ("PUT", "/actions", '{"action_type": "InstanceStart"}'),
    ("PUT", "/actions", '{"action_type": "Explode"}'),
    ("PATCH", "/vm", '{"state": "Paused"}'),
    ("PUT", "/snapshot/create", '{"snapshot_path": "/tmp/s", "mem_file_path": "/tmp/m"}'),
    ("PUT", "/boot-source", '{"kernel_image_path": "' + "x" * 60000 + '"}'),
    ("GET", "/vm/config", None),
]

# On a running guest: KERNEL and DRIVE stand for paths the script makes.
RUNNING = [
    ("PUT", "/boot-source", '{"kernel_image_path": "KERNEL"}'),
    ("PUT", "/machine-config", '{"vcpu_count": 1, "mem_size_mib": 32}'),
    ("PUT", "/drives/d", '{"drive_id": "d", "path_on_host": "DRIVE", "is_root_device": false}'),
    ("PUT", "/actions", '{"action_type": "InstanceStart"}'),
    ("GET", "/", None),
    ("PUT", "/actions", '{"action_type": "InstanceStart"}'),
    ("PUT", "/machine-config", '{"vcpu_count": 1, "mem_size_mib": 32}'),
    ("PUT", "/boot-source", '{"kernel_image_path": "KERNEL"}'),
    ("PUT", "/drives/e", '{"drive_id": "e", "path_on_host": "DRIVE", "is_root_device": false}'),
    ("PATCH", "/drives/d", '{"drive_id": "d"}'),
    ("PATCH", "/drives/nope", '{"drive_id": "nope", "path_on_host": "DRIVE"}'),
    ("PATCH", "/drives/d", '{"drive_id": "d", "path_on_host": "/nonexistent/new.img"}'),
    ("PATCH", "/drives/d", '{"drive_id": "d", "path_on_host": "DRIVE"}'),
    ("PATCH", "/network-interfaces/eth0", '{"iface_id": "eth0"}'),
    ("PATCH", "/balloon", '{"amount_mib": 1}'),
    ("GET", "/balloon/statistics", None),
    ("PUT", "/snapshot/create", '{"snapshot_path": "/tmp/fc-diff-s", "mem_file_path": "/tmp/fc-diff-m"}'),
    ("PUT", "/snapshot/load", '{"snapshot_path": "/tmp/fc-diff-s", "mem_file_path": "/tmp/fc-diff-m"}'),
    ("PATCH", "/vm", '{"state": "Resumed"}'),
    ("PATCH", "/vm", '{"state": "Paused"}'),
    ("PATCH", "/vm", '{"state": "Paused"}'),
    ("GET", "/", None),
    ("PUT", "/snapshot/create", '{"snapshot_path": "/tmp/fc-diff-s", "mem_file_path": "/tmp/fc-diff-m", "snapshot_type": "Diff"}'),
    ("PATCH", "/vm", '{"state": "Resumed"}'),
    ("PUT", "/actions", '{"action_type": "FlushMetrics"}'),
    ("PUT", "/logger", '{"level": "Info"}'),
    ("PUT", "/mmds/config", '{"network_interfaces": []}'),
    ("PUT", "/vsock", '{"guest_cid": 3, "uds_path": "/tmp/fc-diff.vsock"}'),
]

# A 64-bit ELF kernel at 1 MiB that spins: jmp $.
SPIN = bytes([0xEB, 0xFE])


def ask(sock, method, path, body):
    conn = UnixHTTPConnection(sock, timeout=10)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        reply = conn.getresponse()
        return reply.status, reply.read().decode(errors="replace")
    except OSError as e:
        return None, f"({e})"
    finally:
        conn.close()


def answers(binary, workdir, name, requests):
    sock = os.path.join(workdir, f"{name}.sock")
    log = open(os.path.join(workdir, f"{name}.log"), "w")
    vmm = subprocess.Popen([binary, "--api-sock", sock, "--id", "diff"], stdout=log, stderr=log, cwd=workdir)
    deadline = time.time() + 10
    while not os.path.exists(sock):
        if time.time() > deadline:
            raise SystemExit(f"{binary}: no API socket")
        time.sleep(0.02)
    got = [ask(sock, *request) for request in requests]
    vmm.kill()
    vmm.wait()
    return got


def normal(body):
    try:
        return json.dumps(json.loads(body), sort_keys=True)
    except ValueError:
        return body


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--firecracker", required=True, help="a Firecracker binary built from its repository")
    default_lkvm = os.path.join(os.path.dirname(__file__), "../target/x86_64-unknown-linux-gnu/release/lkvm")
    parser.add_argument("--lkvm", default=default_lkvm)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        link = os.path.join(workdir, "firecracker")
        os.symlink(os.path.abspath(args.lkvm), link)
        kernel, drive = os.path.join(workdir, "spin.elf"), os.path.join(workdir, "disk.img")
        with open(kernel, "wb") as f:
            f.write(elf_kernel(SPIN))
        with open(drive, "wb") as f:
            f.truncate(1 << 20)
        running = [(m, p, b and b.replace("KERNEL", kernel).replace("DRIVE", drive)) for m, p, b in RUNNING]
        requests = REQUESTS + running
        ours = answers(link, workdir, "lkvm", REQUESTS) + answers(link, workdir, "lkvm-running", running)
        fc = os.path.abspath(args.firecracker)
        theirs = answers(fc, workdir, "fc", REQUESTS) + answers(fc, workdir, "fc-running", running)
    differ = 0
    for (method, path, body), mine, real in zip(requests, ours, theirs):
        if mine[0] == real[0] and normal(mine[1]) == normal(real[1]):
            continue
        differ += 1
        shown = body if body is None or len(body) < 120 else body[:60] + "..."
        print(f"{method} {path} {shown}\n  firecracker: {real[0]} {real[1][:300]}\n  lkvm:        {mine[0]} {mine[1][:300]}")
    print(f"{differ} of {len(requests)} answers differ")


if __name__ == "__main__":
    main()
