"""Out-of-range requests and bad flags get the contract's errno, and the
connection goes on. libnbd's strict mode is off so the requests reach the
server.

usage: errors.py URI      (a writable export of at least 1 MiB)
"""

import nbd

from nbdtest import OURS, connect, eq, expect_errno, log, run


def still_works(h, what):
    eq(len(h.pread(512, 0)), 512, f"read after {what}")


# OUR_CONTRACT: writes past the end get ENOSPC (the spec's SHOULD); qemu-nbd
# 10 answers EINVAL, which the tests accept only from the stand-in.
ENOSPC = "ENOSPC" if OURS else ("ENOSPC", "EINVAL")


def main(uri):
    h = connect(uri, strict=0)
    size = h.get_size()

    cases = [
        ("read crossing the end", "EINVAL", h.pread, 4096, size - 4095),
        ("read at the end", "EINVAL", h.pread, 1, size),
        ("read at 2^63 (overflow)", "EINVAL", h.pread, 512, 1 << 63),
        ("read far past the end", "EINVAL", h.pread, 512, size * 3),
        ("write crossing the end", ENOSPC, h.pwrite, b"x" * 4096, size - 100),
        ("write at the end", ENOSPC, h.pwrite, b"x", size),
        ("write-zeroes past the end", ENOSPC, h.zero, 4096, size),
        ("trim past the end", "EINVAL", h.trim, 4096, size - 1),
        ("cache past the end", "EINVAL", h.cache, 4096, size),
        ("block status past the end", "EINVAL", h.block_status, 4096, size,
         lambda *a: 0),
        # Flags not valid for the command.
        ("read with NO_HOLE", "EINVAL", lambda: h.pread(512, 0, nbd.CMD_FLAG_NO_HOLE)),
        ("read with REQ_ONE", "EINVAL", lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE)),
        ("write with FAST_ZERO", "EINVAL",
         lambda: h.pwrite(b"y" * 512, 0, nbd.CMD_FLAG_FAST_ZERO)),
        ("trim with DF", "EINVAL", lambda: h.trim(512, 0, nbd.CMD_FLAG_DF)),
    ]
    for case in cases:
        what, want, fn, *args = case
        expect_errno(want, what, fn, *args)
        still_works(h, what)
    h.shutdown()

    # DF is only valid once structured replies are negotiated.
    h = connect(uri, structured=False, strict=0)
    eq(h.can_df(), False, "DF advertised on a simple-reply connection")
    expect_errno("EINVAL", "DF read without structured replies",
                 lambda: h.pread(512, 0, nbd.CMD_FLAG_DF))
    still_works(h, "DF without structured replies")
    expect_errno("EINVAL", "read crossing the end (simple reply)", h.pread, 4096, size - 1)
    still_works(h, "simple-reply error")
    h.shutdown()
    log(f"all error replies as the contract says (ours={OURS})")


run(main)
