"""BLOCK_STATUS (base:allocation) against the served file's real holes.

usage: block_status.py URI IMAGE
"""

import nbd

from nbdtest import OURS, check, connect, eq, file_extents, log, block_status_map, run


def expected_map(image, offset, count):
    out = []
    end = offset + count
    for o, n, is_data in file_extents(image):
        s, e = max(o, offset), min(o + n, end)
        if s < e:
            out.append((s, e - s, 0 if is_data else nbd.STATE_HOLE | nbd.STATE_ZERO))
    return out


def main(uri, image):
    h = connect(uri)
    size = h.get_size()
    eq(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), True, "base:allocation negotiated")

    # The whole export, then odd offsets and lengths.
    for off, count in [(0, size), (1, size - 1), (65536 + 511, 3 * 1024 * 1024 + 3),
                       (size - 4097, 4097), (size - 1, 1)]:
        got = block_status_map(h, off, count)
        want = expected_map(image, off, count)
        eq(got, want, f"block status map {off}+{count}")
        log(f"ok: block status {off}+{count}: {len(got)} extents")

    # REQ_ONE: one extent, not past the request, matching the file.
    for o, n, is_data in file_extents(image):
        for off, count in [(o, n), (o + n // 2, n - n // 2), (o, 4096)]:
            count = min(count, size - off)
            if count <= 0:
                continue
            got = []

            def cb(ctx, offset, entries, err, got=got):
                got.append(list(entries))
                return 0

            h.block_status(count, off, cb, nbd.CMD_FLAG_REQ_ONE)
            eq(len(got), 1, f"REQ_ONE at {off}: callbacks")
            entries = got[0]
            eq(len(entries), 2, f"REQ_ONE at {off}+{count} must give one extent: {entries}")
            length, status = entries
            check(0 < length <= count, f"REQ_ONE extent length {length} not in (0, {count}]")
            want = 0 if is_data else nbd.STATE_HOLE | nbd.STATE_ZERO
            eq(status, want, f"REQ_ONE status at {off} ({'data' if is_data else 'hole'})")
            if OURS:
                # OUR_CONTRACT: extents come straight from SEEK_DATA/SEEK_HOLE,
                # so one extent covers the whole run (or the request).
                eq(length, min(count, o + n - off), f"REQ_ONE length at {off}")
    log("ok: REQ_ONE")

    # Without REQ_ONE a short request may be answered with a longer extent,
    # but never with more than the spec allows (checked by block_status_map).
    h.shutdown()


run(main)
