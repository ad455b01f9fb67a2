#!/usr/bin/env python3
"""Boot benchmark: lkvm against QEMU (microvm, PVH) on the same kernel and initramfs, side by
side in one run, reported as medians and ratios.

Per VMM and run: wall time from process start to the guest init's first result line on the
serial console (the same point for both VMMs), wall time to process exit, peak RSS, and peak
RSS less the resident part of the guest RAM mapping (the VMM's own overhead). For lkvm also
its boot-marker time, and start-to-exit for a flat real-mode payload.

Usage: bench/boot.py [--runs N] (after scripts/install-deps.sh --bench and guest/build.sh)
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.path.join(ROOT, "guest", "out")
LKVM = os.path.join(ROOT, "target", "release", "lkvm")
MEM_MIB = 128
HOST_PARAMS = "noxsave clearcpuid=popcnt,fsgsbase,smap,rdrand,rdseed,rdpid,invpcid,pcid,cx16 quiet"
# lkvm's generated defaults, given to QEMU explicitly so both guests see the same command line.
LKVM_DEFAULTS = "console=ttyS0 reboot=k panic=1 pci=conf1 i8042.direct=1 i8042.dumbkbd=1 i8042.nopnp=1 i8042.noaux=1"


def guest_mapping_rss_kb(pid, guest_kb):
    """(total RSS, RSS of mappings at least as large as guest RAM) in KiB, from smaps."""
    total = guest = 0
    size = 0
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if line.startswith("Size:"):
                    size = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
                    total += rss
                    if size >= guest_kb:
                        guest += rss
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return total, guest


def run(cmd, marker_re, timeout=600):
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = {}
    peak = {"rss": 0, "overhead": 0}

    def sample():
        while proc.poll() is None:
            r = guest_mapping_rss_kb(proc.pid, MEM_MIB * 1024)
            if r:
                peak["rss"] = max(peak["rss"], r[0])
                peak["overhead"] = max(peak["overhead"], r[0] - r[1])
            time.sleep(0.05)

    def read_stdout():
        for line in proc.stdout:
            if b"LKVM-RESULT" in line and "init" not in seen:
                seen["init"] = time.monotonic() - start

    stderr_lines = []
    threads = [threading.Thread(target=sample), threading.Thread(target=read_stdout),
               threading.Thread(target=lambda: stderr_lines.extend(proc.stderr))]
    for t in threads:
        t.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    marker = None
    for line in stderr_lines:
        m = re.search(rb"boot marker 1 .* at ([0-9.]+) s", line)
        if m:
            marker = float(m.group(1))
    return {"init": seen.get("init"), "exit": elapsed, "rss": peak["rss"] / 1024,
            "overhead": peak["overhead"] / 1024, "marker": marker, "code": proc.returncode}


def lkvm_cmd():
    return [LKVM, "run", "-k", f"{GUEST}/vmlinux", "-i", f"{GUEST}/initramfs.cpio", "-m", str(MEM_MIB),
            "-c", "1", "--loglevel", "info", "-p", HOST_PARAMS]


def qemu_cmd():
    return ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=on", "-device", "i8042", "-enable-kvm", "-cpu", "host",
            "-m", str(MEM_MIB), "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-no-reboot", "-kernel", f"{GUEST}/vmlinux", "-initrd", f"{GUEST}/initramfs.cpio",
            "-append", f"{LKVM_DEFAULTS} {HOST_PARAMS}"]


def flat_payload():
    # Prints "hi" on COM1, then resets through the i8042.
    code = bytes([0xba, 0xf8, 0x03, 0xb0, ord("h"), 0xee, 0xb0, ord("i"), 0xee, 0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe])
    f = tempfile.NamedTemporaryFile(suffix=".bin", delete=False)
    f.write(code)
    f.close()
    return f.name


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, unit):
    return "-" if v is None else f"{v:.2f}{unit}" if unit == " s" else f"{v:.1f}{unit}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    results = {"lkvm": [], "qemu": []}
    for i in range(args.runs):
        # Interleaved, so drift in machine load hits both alike.
        for name, cmd in (("lkvm", lkvm_cmd()), ("qemu", qemu_cmd())):
            r = run(cmd, None)
            results[name].append(r)
            print(f"run {i + 1} {name}: " + ", ".join(f"{k}={v if not isinstance(v, float) else round(v, 2)}"
                                                    for k, v in r.items()), file=sys.stderr)
    flat = flat_payload()
    flat_runs = [run([LKVM, "run", "-k", flat, "-m", "16", "-c", "1"], None)["exit"] for _ in range(20)]
    os.unlink(flat)

    rows = [("start to init (s)", "init", " s"), ("start to exit (s)", "exit", " s"),
            ("peak RSS (MiB)", "rss", " MiB"), ("RSS less guest RAM (MiB)", "overhead", " MiB")]
    print(f"\nBoot benchmark: {args.runs} runs each, -m {MEM_MIB} -c 1, PVH vmlinux + initramfs, medians")
    print(f"| metric | lkvm | QEMU microvm | lkvm / QEMU |")
    print(f"|---|---|---|---|")
    for label, key, unit in rows:
        a, b = med(r[key] for r in results["lkvm"]), med(r[key] for r in results["qemu"])
        ratio = f"{a / b:.2f}" if a is not None and b else "-"
        print(f"| {label} | {fmt(a, unit)} | {fmt(b, unit)} | {ratio} |")
    print(f"| lkvm boot marker (s) | {fmt(med(r['marker'] for r in results['lkvm']), ' s')} | | |")
    print(f"| flat payload start to exit, lkvm, 20 runs (ms) | {statistics.median(flat_runs) * 1000:.1f} | | |")
    bad = [(n, r["code"]) for n in results for r in results[n] if r["code"] != 0]
    if bad:
        print(f"non-zero exits: {bad}", file=sys.stderr)


if __name__ == "__main__":
    main()
