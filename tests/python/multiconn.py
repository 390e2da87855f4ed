"""Several connections at once: a FLUSH on one makes the writes of all the
others visible to every connection (CAN_MULTI_CONN).

usage: multiconn.py URI IMAGE
"""

import os

import nbd

from nbdtest import MiB, OURS, connect, eq, log, read_file, run

N = 4


def main(uri, image):
    hs = [connect(uri) for _ in range(N)]
    if OURS:
        for h in hs:
            eq(h.can_multi_conn(), True, "CAN_MULTI_CONN (OUR_CONTRACT)")
    datas = []
    for i, h in enumerate(hs):
        data = os.urandom(MiB + i)
        h.pwrite(data, i * 2 * MiB)
        datas.append(data)
    hs[-1].flush()
    for j, h in enumerate(hs):
        for i, data in enumerate(datas):
            eq(h.pread(len(data), i * 2 * MiB), data, f"conn {j} reads conn {i}'s write")
    for i, data in enumerate(datas):
        eq(read_file(image, i * 2 * MiB, len(data)), data, f"file has conn {i}'s write")

    # All connections busy at once with async writes, then a flush on one.
    cookies = []
    expect = {}
    for i, h in enumerate(hs):
        for k in range(16):
            off = (i * 16 + k) * 65536
            data = os.urandom(65536)
            expect[off] = data
            cookies.append((h, h.aio_pwrite(nbd.Buffer.from_bytearray(data), off)))
    while any(h.aio_in_flight() for h in hs):
        for h in hs:
            if h.aio_in_flight():
                h.poll(0)
    for h, c in cookies:
        eq(h.aio_command_completed(c), True, "async write completed")
    hs[0].flush()
    for off, data in expect.items():
        eq(hs[(off // 65536) % N].pread(65536, off), data, f"read at {off}")
    for h in hs:
        h.shutdown()
    log(f"ok: {N} connections")


run(main)
