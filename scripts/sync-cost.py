#!/usr/bin/env python3
"""CPU and wall time per durable append on the disk under test, four ways.

Usage: scripts/sync-cost.py [DIR] [COUNT]   (DIR: on the disk to measure; default bench-results/work)

Each way appends COUNT records (600 and 3,000 bytes) into a 64 MiB file that is
zero-filled first, as the log's segments are, and makes each durable before the
next:
  buffered + fdatasync   what the log does: pwrite into the page cache, then fdatasync
  O_DSYNC buffered       the same file opened O_DSYNC: one syscall per append
  O_DIRECT + fdatasync   4 KiB-aligned direct writes of the tail block, then fdatasync
  O_DIRECT | O_DSYNC     direct writes that are durable on return

Prints, per append: wall time, CPU (user + system, of this process) and voluntary
context switches. The interpreter adds a few µs of CPU to every way alike.
"""
import mmap
import os
import resource
import sys
import time

DIR = sys.argv[1] if len(sys.argv) > 1 else "bench-results/work"
COUNT = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
SIZE = 64 << 20


def prepare(path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    zeros = b"\0" * (1 << 20)
    for i in range(SIZE >> 20):
        os.pwrite(fd, zeros, i << 20)
    os.fsync(fd)
    os.close(fd)


def run(path, name, flags, record, sync, direct):
    fd = os.open(path, os.O_RDWR | flags)
    buf = mmap.mmap(-1, 1 << 16)  # page-aligned, as O_DIRECT needs
    buf.write(b"x" * len(buf))
    data = b"y" * record
    offset = 0
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for _ in range(COUNT):
        if direct:
            start = offset & ~4095
            end = (offset + record + 4095) & ~4095
            os.pwrite(fd, memoryview(buf)[: end - start], start)
        else:
            os.pwrite(fd, data, offset)
        if sync:
            os.fdatasync(fd)
        offset += record
    t1 = time.perf_counter()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    os.close(fd)
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    print(
        f"{name:22s} {record:5d} B  wall {1e6 * (t1 - t0) / COUNT:7.1f} µs"
        f"  cpu {1e6 * cpu / COUNT:6.1f} µs"
        f"  switches {(r1.ru_nvcsw - r0.ru_nvcsw) / COUNT:4.1f}"
    )


def main():
    os.makedirs(DIR, exist_ok=True)
    path = os.path.join(DIR, "sync-cost.tmp")
    try:
        prepare(path)
        for record in (600, 3000):
            run(path, "buffered + fdatasync", 0, record, True, False)
            run(path, "O_DSYNC buffered", os.O_DSYNC, record, False, False)
            run(path, "O_DIRECT + fdatasync", os.O_DIRECT, record, True, True)
            run(path, "O_DIRECT | O_DSYNC", os.O_DIRECT | os.O_DSYNC, record, False, True)
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
