"""Simple vs structured replies, sparse structured reads and DF.

usage: replies.py URI IMAGE   (IMAGE: the served raw file, with holes)
"""

import os

import nbd

from nbdtest import MiB, OURS, check, connect, eq, file_extents, log, read_file, run


def main(uri, image):
    size = os.path.getsize(image)
    extents = file_extents(image)
    check(any(not d for _, _, d in extents) and any(d for _, _, d in extents),
          f"test image needs data and holes: {extents}")

    # Simple replies only: no structured replies, no DF, no block status.
    h = connect(uri, structured=False)
    eq(h.get_structured_replies_negotiated(), False, "structured replies negotiated")
    eq(h.can_df(), False, "DF advertised without structured replies")
    eq(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), False,
       "base:allocation without structured replies")
    eq(h.get_size(), size, "export size (simple)")
    for off, count in [(0, 4096), (1, 1), (12345, 99999), (size - 7, 7), (0, 4 * MiB)]:
        eq(h.pread(count, off), read_file(image, off, count), f"simple read {off}+{count}")
    # A large read across data and holes.
    eq(h.pread(size, 0) == read_file(image, 0, size), True, "simple read of the whole image")
    h.shutdown()
    log("ok: simple replies")

    # Structured replies: DF advertised, sparse reads use holes.
    h = connect(uri, structured=True)
    eq(h.get_structured_replies_negotiated(), True, "structured replies negotiated")
    eq(h.can_df(), True, "DF advertised with structured replies")
    eq(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), True, "base:allocation selected")

    for off, length, is_data in extents:
        count = min(length, 2 * MiB)
        chunks = []

        def cb(subbuf, offset, status, err, chunks=chunks):
            chunks.append((offset, len(subbuf), status))
            return 0

        buf = h.pread_structured(count, off, cb)
        eq(bytes(buf), read_file(image, off, count), f"structured read {off}+{count}")
        covered = sorted((o, n) for o, n, _ in chunks)
        pos = off
        for o, n in covered:
            eq(o, pos, f"chunks of read {off}+{count} must tile it: {chunks}")
            pos += n
        eq(pos, off + count, f"chunks cover read {off}+{count}: {chunks}")
        kinds = {s for _, _, s in chunks}
        if not is_data:
            # A read wholly inside a hole: every chunk must be a hole (the
            # contract's sparse reads; qemu-nbd does the same).
            eq(kinds, {nbd.READ_HOLE}, f"read {off}+{count} inside a hole: chunk kinds")
        log(f"ok: structured read {off}+{count} ({'data' if is_data else 'hole'}) "
            f"in {len(chunks)} chunk(s)")

    # A read spanning data and a hole, with DF: exactly one data chunk.
    first_hole = next(o for o, _, d in extents if not d)
    off = max(0, first_hole - 65536)
    chunks = []

    def cb(subbuf, offset, status, err):
        chunks.append((offset, len(subbuf), status))
        return 0

    buf = h.pread_structured(131072, off, cb, nbd.CMD_FLAG_DF)
    eq(bytes(buf), read_file(image, off, 131072), "DF read across data and hole")
    eq(len(chunks), 1, f"DF read must be one chunk, got {chunks}")
    eq(chunks[0][2], nbd.READ_DATA, "DF read across data and hole: chunk kind")
    log("ok: DF read is one chunk")

    # Without DF the same range may be split; both must read the same bytes.
    chunks.clear()
    buf = h.pread_structured(131072, off, cb)
    eq(bytes(buf), read_file(image, off, 131072), "read across data and hole")
    if OURS:
        # OUR_CONTRACT: sparse reads send the hole part as OFFSET_HOLE.
        check(nbd.READ_HOLE in {s for _, _, s in chunks},
              f"read across data and hole without DF: expected a hole chunk, got {chunks}")
    h.shutdown()


run(main)
