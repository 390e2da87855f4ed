# Restore an incremental backup the way a backup tool does it over NBD:
# connect to the disk's export of `nbdbridge serve --backup VM
# --from-checkpoint CP` with `base:allocation` and the backup's dirty
# bitmap, and copy only the dirty extents into an overlay (served over NBD)
# whose backing file is the full backup: dirty zero extents are zeroed
# without reading, dirty data extents are read and written. Prints
# "read BYTES dirty BYTES".
#
# usage: backup_incremental.py BACKUP-URI CONTEXT OVERLAY-URI
import sys

import nbd

src_uri, context, dst_uri = sys.argv[1:4]
STEP = 4 << 20
STATE_ZERO = nbd.STATE_ZERO
DIRTY = 1

src = nbd.NBD()
src.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
src.add_meta_context(context)
src.connect_uri(src_uri)
if not src.can_meta_context(context):
    sys.exit("the export offers no %s" % context)
dst = nbd.NBD()
dst.connect_uri(dst_uri)
size = src.get_size()
if dst.get_size() != size:
    sys.exit("overlay size %d != export size %d" % (dst.get_size(), size))


def extents(name):
    """[(offset, length, flags)] of context `name` over the whole export."""
    out, offset = [], 0
    while offset < size:
        got = []

        def cb(meta, start, entries, err):
            if meta == name:
                pos = start
                for i in range(0, len(entries) - 1, 2):
                    got.append((pos, entries[i], entries[i + 1]))
                    pos += entries[i]
            return 0

        src.block_status(min(size - offset, 1 << 30), offset, cb)
        if not got:
            sys.exit("no %s extents at %d" % (name, offset))
        for start, length, flags in got:
            end = min(start + length, size)
            if end > start:
                out.append((start, end - start, flags))
        offset = min(got[-1][0] + got[-1][1], size)
    return out


alloc = extents(nbd.CONTEXT_BASE_ALLOCATION)
dirty = [(o, n) for o, n, f in extents(context) if f & DIRTY]
read = 0
for d_off, d_len in dirty:
    d_end = d_off + d_len
    for a_off, a_len, flags in alloc:
        start, end = max(d_off, a_off), min(d_end, a_off + a_len)
        if start >= end:
            continue
        if flags & STATE_ZERO:
            dst.zero(end - start, start)
            continue
        for off in range(start, end, STEP):
            n = min(STEP, end - off)
            dst.pwrite(src.pread(n, off), off)
            read += n
dst.flush()
src.shutdown()
dst.shutdown()
print("read %d dirty %d" % (read, sum(n for _, n in dirty)))
