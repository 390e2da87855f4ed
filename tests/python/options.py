"""Negotiation through libnbd's option mode: LIST, INFO (size, flags, name,
description, block sizes), LIST_META_CONTEXT, an unknown export, then GO.

usage: options.py URI EXPORT DESCRIPTION SIZE
"""

import nbd

from nbdtest import MiB, OURS, check, connect, eq, log, run


def main(uri, export, description, size):
    size = int(size)
    h = connect(uri, opt_mode=True)
    h.set_full_info(True)
    eq(h.aio_is_negotiating(), True, "in option mode")

    exports = []
    n = h.opt_list(lambda name, desc: exports.append((name, desc)))
    eq(n, len(exports), "opt_list count")
    check(any(name == export for name, _ in exports),
          f"export {export!r} not in the LIST reply {exports}")
    if OURS:
        eq(exports, [(export, description)], "LIST reply (OUR_CONTRACT: one export)")
    log(f"ok: LIST {exports}")

    h.opt_info()
    eq(h.get_size(), size, "INFO export size")
    eq(h.is_read_only(), False, "INFO read-only flag")
    eq(h.get_canonical_export_name(), export, "INFO_NAME")
    eq(h.get_export_description(), description, "INFO_DESCRIPTION")
    sizes = [h.get_block_size(k) for k in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED,
                                            nbd.SIZE_MAXIMUM)]
    if OURS:
        eq(sizes, [1, 4096, 32 * MiB], "INFO_BLOCK_SIZE min/preferred/max (OUR_CONTRACT)")
    else:
        check(sizes[2] >= MiB, f"block sizes {sizes}")
    log(f"ok: INFO size={size} block sizes={sizes}")

    # Meta contexts: all, the base: wildcard, one exact name, an unknown namespace.
    for queries, want_base in [([], True), (["base:"], True),
                               (["base:allocation"], True), (["x-nope:thing"], False)]:
        h.clear_meta_contexts()
        for q in queries:
            h.add_meta_context(q)
        found = []
        n = h.opt_list_meta_context(lambda name: found.append(name))
        eq(n, len(found), f"LIST_META_CONTEXT {queries} count")
        eq("base:allocation" in found, want_base,
           f"base:allocation in LIST_META_CONTEXT {queries} reply {found}")
        if OURS and queries == ["x-nope:thing"]:
            eq(found, [], "unknown namespace lists nothing")
        log(f"ok: LIST_META_CONTEXT {queries} -> {found}")

    # An unknown export: INFO fails, the connection goes on.
    h.set_export_name("no-such-export")
    try:
        h.opt_info()
        raise AssertionError("INFO for an unknown export succeeded")
    except nbd.Error as e:
        log(f"ok: INFO unknown export -> {e}")
    eq(h.aio_is_negotiating(), True, "still negotiating after a failed INFO")

    # GO for the real export, with base:allocation.
    h.set_export_name(export)
    h.clear_meta_contexts()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.opt_go()
    eq(h.aio_is_ready(), True, "ready after GO")
    eq(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), True, "base:allocation after GO")
    eq(h.get_size(), size, "GO export size")
    eq(len(h.pread(4096, 0)), 4096, "read after GO")
    h.shutdown()

    # A plain connect to an unknown export fails.
    h = nbd.NBD()
    h.set_export_name("no-such-export")
    bad = uri.replace(f"/{export}", "/no-such-export", 1)
    try:
        h.connect_uri(bad)
        raise AssertionError(f"connected to an unknown export via {bad}")
    except nbd.Error as e:
        log(f"ok: connect to unknown export -> {e}")

    # OPT_ABORT ends negotiation cleanly.
    h = connect(uri, opt_mode=True)
    h.opt_abort()
    eq(h.aio_is_closed(), True, "closed after opt_abort")
    log("ok: ABORT")


run(main)
