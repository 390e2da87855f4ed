"""Helpers shared by the libnbd test scripts (run with Debian's /usr/bin/python3).

Every check raises AssertionError with a message naming what was expected and
what came back; run() turns that into a non-zero exit with the message on
stderr, which the Rust test shows.
"""

import errno
import os
import sys
import traceback

import nbd

# True when the server under test is nbdbridge (not the qemu-nbd stand-in):
# checks of behaviour that only our contract pins down run only then.
OURS = os.environ.get("NBDBRIDGE_TEST_OURS", "1") == "1"

MiB = 1024 * 1024


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def connect(uri, structured=True, strict=None, meta=True, opt_mode=False):
    """A handle connected to uri. strict=0 sends requests libnbd would refuse."""
    h = nbd.NBD()
    h.set_handle_name("test")
    h.set_request_structured_replies(structured)
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if strict is not None:
        h.set_strict_mode(strict)
    if opt_mode:
        h.set_opt_mode(True)
    h.connect_uri(uri)
    return h


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def eq(got, want, what):
    if got != want:
        raise AssertionError(f"{what}: expected {want!r}, got {got!r}")


def wait_all(h, cookies):
    """Wait for every command of h; return {index: errno number (0 = ok)}."""
    results = {}
    while len(results) < len(cookies):
        for i, c in enumerate(cookies):
            if i in results:
                continue
            try:
                if h.aio_command_completed(c):
                    results[i] = 0
            except nbd.Error as e:
                # libnbd may give the errno's name ("EIO"): its number.
                code = e.errno
                if isinstance(code, str):
                    code = getattr(errno, code, -1)
                results[i] = code or -1
        if len(results) < len(cookies):
            h.poll(-1)
    return results


def errno_name(num):
    return errno.errorcode.get(num, str(num))


def expect_errno(want, what, fn, *args, **kw):
    """Call fn and assert it fails with errno `want` (a name like 'EINVAL', or
    a tuple of accepted names)."""
    accepted = want if isinstance(want, tuple) else (want,)
    try:
        fn(*args, **kw)
    except nbd.Error as e:
        got = e.errno
        if got not in accepted:
            raise AssertionError(
                f"{what}: expected {want}, got {got} ({e.string})") from None
        log(f"ok: {what} -> {got}")
        return
    raise AssertionError(f"{what}: expected {want}, but it succeeded")


def read_file(path, offset, count):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(count)


def file_extents(path):
    """[(offset, length, is_data)] from SEEK_DATA/SEEK_HOLE, merged."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                data = size
            if data > pos:
                out.append((pos, data - pos, False))
            if data >= size:
                break
            try:
                hole = os.lseek(fd, data, os.SEEK_HOLE)
            except OSError:
                hole = size
            out.append((data, hole - data, True))
            pos = hole
    finally:
        os.close(fd)
    return out


def block_status_map(h, offset, count, flags=0):
    """All base:allocation extents from offset for count bytes, as a list of
    (offset, length, flags) from as many BLOCK_STATUS calls as needed."""
    out = []
    end = offset + count
    pos = offset
    while pos < end:
        got = []

        def cb(ctx, off, entries, err, got=got):
            eq(ctx, nbd.CONTEXT_BASE_ALLOCATION, "block status context")
            eq(off, pos, "block status callback offset")
            got.append(list(entries))
            return 0

        h.block_status(end - pos, pos, cb, flags)
        eq(len(got), 1, f"block status chunks for base:allocation at {pos}")
        entries = got[0]
        check(len(entries) >= 2 and len(entries) % 2 == 0,
              f"block status at {pos}: entries {entries!r}")
        for i in range(0, len(entries), 2):
            length, status = entries[i], entries[i + 1]
            check(length > 0, f"zero-length extent at {pos}: {entries!r}")
            check(status & ~3 == 0, f"reserved status bits {status:#x} at {pos}")
            length = min(length, end - pos)
            if out and out[-1][2] == status and out[-1][0] + out[-1][1] == pos:
                out[-1] = (out[-1][0], out[-1][1] + length, status)
            else:
                out.append((pos, length, status))
            pos += length
            if pos >= end:
                break
    return out


def run(main):
    """Run main(); exit 1 with the failure on stderr."""
    try:
        main(*sys.argv[1:])
    except AssertionError as e:
        log(f"FAILED: {e}")
        traceback.print_exc()
        sys.exit(1)
    except nbd.Error as e:
        log(f"FAILED: unexpected libnbd error: {e}")
        traceback.print_exc()
        sys.exit(1)
    log("all checks passed")
