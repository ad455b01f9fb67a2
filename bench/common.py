"""Helpers shared by the benchmarks: paths, guest parameters, and running a VMM while timing
its console output and sampling its memory."""
import os
import re
import statistics
import subprocess
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.path.join(ROOT, "guest", "out")
LKVM = os.path.join(ROOT, "target", "x86_64-unknown-linux-gnu", "release", "lkvm")
MEM_MIB = 128
HOST_PARAMS = "noxsave clearcpuid=popcnt,fsgsbase,smap,rdrand,rdseed,rdpid,invpcid,pcid,cx16 clocksource=kvm-clock quiet"
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


def run(cmd, timeout=600):
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

    lines = []

    def read_stdout():
        for line in proc.stdout:
            lines.append(line.decode(errors="replace").rstrip())
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
            "overhead": peak["overhead"] / 1024, "marker": marker, "code": proc.returncode, "lines": lines}


def results(lines):
    """The guest init's LKVM-RESULT key=value lines as a dict."""
    out = {}
    for line in lines:
        m = re.match(r"LKVM-RESULT ([^=]+)=(.*)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio_table(rows, columns, baseline, digits=1):
    """Prints a markdown table: a line per (label, {column: median}) with the medians, then each
    other column's ratio to `baseline`."""
    others = [c for c in columns if c != baseline]
    print("| test | " + " | ".join(columns) + " | " + " | ".join(f"{c} / {baseline}" for c in others) + " |")
    print("|---" * (1 + len(columns) + len(others)) + "|")
    for label, m in rows:
        cells = ["-" if m[c] is None else f"{m[c]:.{digits}f}" for c in columns]
        ratios = [f"{m[c] / m[baseline]:.2f}" if m[c] and m[baseline] else "-" for c in others]
        print(f"| {label} | " + " | ".join(cells + ratios) + " |")


def qemu_base(mem_mib=None):
    """QEMU microvm with the same kernel, initramfs and i8042 reset path as lkvm's guests."""
    return ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=on,acpi=off", "-device", "i8042", "-enable-kvm",
            "-cpu", "host,-arch-capabilities", "-m", str(mem_mib or MEM_MIB), "-smp", "1", "-nodefaults", "-no-user-config",
            "-nographic", "-serial", "stdio", "-no-reboot", "-kernel", f"{GUEST}/vmlinux",
            "-initrd", f"{GUEST}/initramfs.cpio"]


