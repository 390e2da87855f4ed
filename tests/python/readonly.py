"""A read-only export: flags, reads work, every write-like command gets
EPERM and the connection goes on.

usage: readonly.py URI IMAGE
"""

import nbd

from nbdtest import OURS, connect, eq, expect_errno, log, read_file, run


def main(uri, image):
    h = connect(uri, strict=0)
    eq(h.is_read_only(), True, "is_read_only")
    eq(h.can_trim(), False, "TRIM advertised on a read-only export")
    eq(h.can_zero(), False, "WRITE_ZEROES advertised on a read-only export")
    eq(h.can_fast_zero(), False, "FAST_ZERO advertised on a read-only export")
    before = read_file(image, 0, 1 << 20)
    for what, fn in [
        ("write", lambda: h.pwrite(b"z" * 4096, 0)),
        ("write with FUA", lambda: h.pwrite(b"z" * 512, 4096, nbd.CMD_FLAG_FUA)),
        ("write-zeroes", lambda: h.zero(4096, 0)),
        ("trim", lambda: h.trim(4096, 0)),
    ]:
        # OUR_CONTRACT: EPERM. qemu-nbd 10 answers EINVAL, which the spec
        # also allows for a request the export cannot take.
        want = "EPERM" if OURS else ("EPERM", "EINVAL")
        expect_errno(want, f"{what} on a read-only export", fn)
        eq(h.pread(4096, 0), before[:4096], f"read after rejected {what}")
    eq(read_file(image, 0, 1 << 20), before, "file unchanged by rejected writes")
    # Reads and CACHE still work.
    eq(h.pread(1 << 20, 0), before, "read 1 MiB")
    if h.can_cache():
        h.cache(1 << 20, 0)
    h.shutdown()
    log("ok: read-only export")


run(main)
