"""64 requests in flight on one connection: writes, then reads, then a mix,
with completions in any order; checked against the served file.

usage: inflight.py URI IMAGE   (a writable export of at least 8 MiB)
"""

import os

import nbd

from nbdtest import MiB, check, connect, eq, log, read_file, run

DEPTH = 64


def drain(h, cookies, what):
    """Poll until every command completed; assert none failed."""
    pending = set(cookies)
    peak = h.aio_in_flight()
    while pending:
        h.poll(-1)
        for c in list(pending):
            try:
                if h.aio_command_completed(c):
                    pending.discard(c)
            except nbd.Error as e:
                raise AssertionError(f"{what}: command {c} failed: {e}") from None
    return peak


def main(uri, image):
    h = connect(uri)
    size = h.get_size()
    check(size >= 8 * MiB, f"export too small: {size}")

    # 64 writes of different sizes at different (odd) offsets.
    chunk = size // DEPTH
    writes = []
    cookies = []
    for i in range(DEPTH):
        n = 4096 * (1 + i % 16) + (i * 7) % 513
        off = i * chunk + (i * 13) % 4096
        data = os.urandom(n)
        writes.append((off, data))
        cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(data), off))
    issued = h.aio_in_flight()
    eq(issued, DEPTH, "writes queued before the first poll")
    drain(h, cookies, "aio_pwrite")
    h.flush()
    for off, data in writes:
        eq(read_file(image, off, len(data)), data, f"file after aio write at {off}")
    log(f"ok: {DEPTH} writes in flight")

    # 64 reads in flight, out of order offsets.
    bufs = []
    cookies = []
    for off, data in reversed(writes):
        buf = nbd.Buffer(len(data))
        bufs.append((off, data, buf))
        cookies.append(h.aio_pread(buf, off))
    eq(h.aio_in_flight(), DEPTH, "reads queued")
    drain(h, cookies, "aio_pread")
    for off, data, buf in bufs:
        eq(bytes(buf.to_bytearray()), data, f"aio read at {off}")
    log(f"ok: {DEPTH} reads in flight")

    # A mix of large reads and writes, with a flush, several rounds.
    for round_ in range(3):
        ops = []
        cookies = []
        for i in range(DEPTH):
            off = (i * 131072 + round_ * 4096) % (size - 262144)
            if i % 2:
                data = os.urandom(65536)
                ops.append(("w", off, data))
                cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(data), off))
            else:
                buf = nbd.Buffer(262144)
                ops.append(("r", off, buf))
                cookies.append(h.aio_pread(buf, off))
        cookies.append(h.aio_flush())
        drain(h, cookies, f"mixed round {round_}")
    h.flush()
    whole = h.pread(size, 0)
    eq(whole == read_file(image, 0, size), True, "export equals file after the mixed rounds")
    log("ok: mixed rounds")
    h.shutdown()


run(main)
