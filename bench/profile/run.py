#!/usr/bin/env python3
"""Where a datapath case spends its time, by source line.

    sudo bench/profile/run.py established|new|non-service [--secs N] [--top N]

Runs the datapath bench's profile mode (XDPROXY_PROFILE, see
tests/benches/datapath.rs): one case, steady state, over and over. While it
runs, `perf record` samples every CPU (cpu-clock, a timer, so it works in VMs
without hardware counters), and the JIT-compiled images of the XDP programs,
with their line info, are read through the bpf syscall. Each sample inside a
program is then put on the source line the JIT compiled its instruction
from (`bpftool prog dump xlated linum` names the lines).

A sample lands on the instruction that waits to retire, so a load's cost
shows on the instruction that uses it: read the lines as the critical path,
not as per-instruction costs. Needs root, perf and bpftool.
"""

import argparse
import bisect
import collections
import ctypes
import os
import re
import struct
import subprocess
import sys
import tempfile

SYS_BPF = 321  # x86_64
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
INFO_SIZE = 232  # struct bpf_prog_info up to attach_btf_id (6.x)
PROGRAMS = ("xdproxy_xdp", "xdproxy_xdp_new")

libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(bytes(attr), len(attr))
    ret = libc.syscall(SYS_BPF, cmd, buf, len(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def prog_info(fd, request):
    buf = ctypes.create_string_buffer(bytes(request), INFO_SIZE)
    bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("<IIQ", fd, INFO_SIZE, ctypes.addressof(buf)) + bytes(112))
    return buf.raw


class Program:
    """A loaded program's JIT images (one per function) and line info."""

    def __init__(self, name, prog_id):
        self.name = name
        fd = bpf(BPF_PROG_GET_FD_BY_ID, struct.pack("<I", prog_id) + bytes(124))
        try:
            self._read(fd)
        finally:
            os.close(fd)
        self.source = xlated_lines(prog_id)

    def _read(self, fd):
        info = prog_info(fd, bytes(INFO_SIZE))
        u32 = lambda off: struct.unpack_from("<I", info, off)[0]
        n_ksyms, n_lens, n_lines = u32(104), u32(108), u32(168)
        line_size = u32(172)
        ksyms = (ctypes.c_uint64 * n_ksyms)()
        lens = (ctypes.c_uint32 * n_lens)()
        lines = ctypes.create_string_buffer(n_lines * line_size)
        jited_lines = (ctypes.c_uint64 * n_lines)()
        request = bytearray(INFO_SIZE)
        struct.pack_into("<II", request, 104, n_ksyms, n_lens)
        struct.pack_into("<QQ", request, 112, ctypes.addressof(ksyms), ctypes.addressof(lens))
        struct.pack_into("<I", request, 148, n_lines)
        struct.pack_into("<QQ", request, 152, ctypes.addressof(lines), ctypes.addressof(jited_lines))
        struct.pack_into("<III", request, 168, n_lines, line_size, 8)
        prog_info(fd, request)
        self.funcs = [(ksyms[i], ksyms[i] + lens[i]) for i in range(n_ksyms)]
        insns = [struct.unpack_from("<I", lines.raw, i * line_size)[0] for i in range(n_lines)]
        self.lines = sorted(zip(jited_lines, insns))
        self.addrs = [a for a, _ in self.lines]

    def holds(self, ip):
        return any(start <= ip < end for start, end in self.funcs)

    def line_of(self, ip):
        i = bisect.bisect_right(self.addrs, ip) - 1
        return self.source.get(self.lines[i][1], "?") if i >= 0 else "?"


def xlated_lines(prog_id):
    """Instruction index -> 'file:line  source' from bpftool's xlated dump."""
    out = subprocess.run(
        ["bpftool", "prog", "dump", "xlated", "id", str(prog_id), "linum"],
        check=True, capture_output=True, text=True,
    ).stdout
    source, current = {}, "?"
    for line in out.splitlines():
        if line.startswith("; "):
            m = re.search(r"\[file:(\S+) line_num:(\d+)", line)
            text = line[2:line.rfind("[file")].strip() if m else line[2:]
            where = f"{m.group(1).split('/')[-1]}:{m.group(2)}" if m else "?"
            current = f"{where:<22} {text[:70]}"
            continue
        m = re.match(r"\s*(\d+):", line)
        if m:
            source[int(m.group(1))] = current
    return source


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", choices=["established", "new", "non-service"])
    parser.add_argument("--secs", type=int, default=20)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (perf -a, the bpf syscall)")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, XDPROXY_PROFILE=args.case, XDPROXY_PROFILE_SECS=str(args.secs))
    bench = subprocess.Popen(
        ["cargo", "bench", "-q", "-p", "proxy-tests", "--bench", "datapath"],
        cwd=root, env=env, stdout=subprocess.PIPE, text=True,
    )
    ids = {}
    for line in bench.stdout:
        if line.startswith("profiling "):
            ids = dict(p.split("=") for p in line.split(": ", 1)[1].split())
            break
    if not ids:
        sys.exit(f"the bench printed no program ids (exit {bench.wait()})")
    programs = [Program(name, int(ids[name])) for name in PROGRAMS if name in ids]
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        subprocess.run(
            ["perf", "record", "-q", "-e", "cpu-clock", "-F", "10000", "-a", "-o", data,
             "--", "sleep", str(args.secs)],
            check=True,
        )
        rest = bench.stdout.read()
        if bench.wait() != 0:
            sys.exit(f"the bench failed:\n{rest}")
        print(rest, end="")
        samples = subprocess.run(
            ["perf", "script", "-i", data, "-F", "ip,sym"],
            check=True, capture_output=True, text=True,
        ).stdout
    report(samples, programs, args.top)


def report(samples, programs, top):
    by_symbol, by_line = collections.Counter(), collections.Counter()
    busy = 0
    for line in samples.splitlines():
        fields = line.split(None, 1)
        if len(fields) < 2:
            continue
        symbol = fields[1].strip()
        if "safe_halt" in symbol or "idle" in symbol:
            continue
        busy += 1
        by_symbol[symbol] += 1
        ip = int(fields[0], 16)
        for program in programs:
            if program.holds(ip):
                # bpf_prog_<tag>_<function>: global functions have their own.
                function = symbol.split("_", 3)[-1]
                by_line[(function, program.line_of(ip))] += 1
                break
    print(f"\n{busy} samples on busy CPUs; by symbol:")
    for symbol, n in by_symbol.most_common(12):
        print(f"{100 * n / busy:6.1f}%  {symbol}")
    ours = sum(by_line.values())
    print(f"\nin {', '.join(p.name for p in programs)} ({ours} samples), by source line:")
    for (function, where), n in by_line.most_common(top):
        print(f"{100 * n / max(ours, 1):6.1f}%  {function:<20} {where}")


if __name__ == "__main__":
    main()
