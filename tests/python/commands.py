"""WRITE with odd offsets and FUA, FLUSH, TRIM, WRITE_ZEROES (NO_HOLE,
FAST_ZERO), CACHE, checked against the served file itself.

usage: commands.py URI IMAGE   (a writable export of 16 MiB)
"""

import os

import nbd

from nbdtest import MiB, OURS, check, connect, eq, expect_errno, log, read_file, run, \
    block_status_map


def blocks(image):
    return os.stat(image).st_blocks * 512


def main(uri, image):
    h = connect(uri)
    size = h.get_size()
    eq(size, 16 * MiB, "export size")
    eq(h.is_read_only(), False, "is_read_only")
    for name in ["can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
                 "can_cache", "can_df"]:
        eq(getattr(h, name)(), True, name)
    if OURS:
        eq(h.can_multi_conn(), True, "can_multi_conn (OUR_CONTRACT)")

    # Odd offsets and lengths, including across 4 KiB boundaries and the end.
    writes = [(1, b"\x01"), (4095, b"\x02\x03\x04"), (12345, os.urandom(77777)),
              (size - 1, b"\xff"), (size - 4098, os.urandom(4097)), (3 * MiB + 7, b"abc")]
    for off, data in writes:
        h.pwrite(data, off)
        eq(h.pread(len(data), off), data, f"read back write {off}+{len(data)}")
    h.flush()
    for off, data in writes:
        eq(read_file(image, off, len(data)), data, f"file after write {off}+{len(data)}")
    log("ok: odd writes, flush")

    # FUA: data is in the file when the reply comes.
    data = os.urandom(65536)
    h.pwrite(data, 5 * MiB + 3, nbd.CMD_FLAG_FUA)
    eq(read_file(image, 5 * MiB + 3, 65536), data, "file after FUA write")
    h.flush()
    log("ok: FUA write")

    # WRITE_ZEROES with NO_HOLE: zeros, and the range stays allocated.
    h.pwrite(os.urandom(MiB), 8 * MiB)
    h.flush()
    b0 = blocks(image)
    h.zero(MiB, 8 * MiB, nbd.CMD_FLAG_NO_HOLE)
    eq(h.pread(MiB, 8 * MiB), bytes(MiB), "read after WRITE_ZEROES NO_HOLE")
    eq(read_file(image, 8 * MiB, MiB), bytes(MiB), "file after WRITE_ZEROES NO_HOLE")
    check(blocks(image) >= b0,
          f"WRITE_ZEROES with NO_HOLE freed space: {b0} -> {blocks(image)} bytes allocated")
    log("ok: WRITE_ZEROES NO_HOLE")

    # WRITE_ZEROES without NO_HOLE: zeros; may punch a hole; block status
    # reports ZERO for it.
    h.pwrite(os.urandom(MiB), 10 * MiB)
    h.flush()
    b0 = blocks(image)
    h.zero(MiB, 10 * MiB)
    eq(h.pread(MiB, 10 * MiB), bytes(MiB), "read after WRITE_ZEROES")
    eq(read_file(image, 10 * MiB, MiB), bytes(MiB), "file after WRITE_ZEROES")
    for off, length, status in block_status_map(h, 10 * MiB, MiB):
        check(status & nbd.STATE_ZERO,
              f"block status after WRITE_ZEROES: {off}+{length} status {status} lacks ZERO")
    if OURS:
        # OUR_CONTRACT: the file backend punches a hole.
        check(blocks(image) <= b0 - MiB,
              f"WRITE_ZEROES did not punch a hole: {b0} -> {blocks(image)} bytes allocated")
    log("ok: WRITE_ZEROES")

    # FAST_ZERO: either fast success (zeros) or ENOTSUP with data untouched.
    data = os.urandom(MiB)
    h.pwrite(data, 12 * MiB)
    try:
        h.zero(MiB, 12 * MiB, nbd.CMD_FLAG_FAST_ZERO)
        eq(h.pread(MiB, 12 * MiB), bytes(MiB), "read after FAST_ZERO")
        log("ok: FAST_ZERO succeeded")
    except nbd.Error as e:
        eq(e.errno, "ENOTSUP", f"FAST_ZERO failure errno ({e.string})")
        eq(h.pread(MiB, 12 * MiB), data, "data after a failed FAST_ZERO")
        check(not OURS, "FAST_ZERO on a local file should succeed (OUR_CONTRACT)")
        log("ok: FAST_ZERO refused with ENOTSUP")
    # FAST_ZERO with NO_HOLE may be refused too, but only with ENOTSUP.
    try:
        h.zero(65536, 12 * MiB, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
        eq(h.pread(65536, 12 * MiB), bytes(65536), "read after FAST_ZERO|NO_HOLE")
    except nbd.Error as e:
        eq(e.errno, "ENOTSUP", f"FAST_ZERO|NO_HOLE failure errno ({e.string})")
    # WRITE_ZEROES with FUA.
    h.pwrite(b"q" * 4096, 13 * MiB)
    h.zero(4096, 13 * MiB, nbd.CMD_FLAG_FUA)
    eq(read_file(image, 13 * MiB, 4096), bytes(4096), "file after WRITE_ZEROES FUA")
    log("ok: FAST_ZERO, FUA zero")

    # TRIM: succeeds; afterwards the range is rewritable.
    h.pwrite(os.urandom(2 * MiB), 14 * MiB)
    h.flush()
    b0 = blocks(image)
    h.trim(2 * MiB, 14 * MiB)
    h.trim(511, 14 * MiB + 1)
    h.trim(4096, 14 * MiB, nbd.CMD_FLAG_FUA)
    if OURS:
        check(blocks(image) < b0,
              f"TRIM did not punch a hole (OUR_CONTRACT): {b0} -> {blocks(image)}")
    h.pwrite(b"after trim", 14 * MiB + 100)
    eq(h.pread(10, 14 * MiB + 100), b"after trim", "write after TRIM")
    log("ok: TRIM")

    # CACHE (a hint) succeeds, with and without FUA-less odd ranges.
    h.cache(MiB, 0)
    h.cache(12345, 7)
    h.cache(size, 0)
    log("ok: CACHE")

    # FLUSH with FUA set is valid once SEND_FUA is advertised (OUR_CONTRACT;
    # libnbd only lets it through with strict mode off).
    h.set_strict_mode(0)
    h.flush(nbd.CMD_FLAG_FUA)
    # Zero-length requests are not specified; they must not end the connection.
    try:
        h.pread(0, 0)
    except nbd.Error as e:
        log(f"zero-length read refused: {e}")
    eq(len(h.pread(4096, 0)), 4096, "read after a zero-length request")
    expect_errno("EINVAL", "read with an unknown flag combination",
                 lambda: h.pread(1, 0, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_REQ_ONE))
    h.shutdown()


run(main)
