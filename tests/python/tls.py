"""NBD TLS through libnbd's binding on a unix socket served with
--tls require: TLS_REQUIRE with a certificates dir reads and writes; a
plaintext handle is refused, and in option mode its options get
NBD_REP_ERR_TLS_REQD (libnbd reports EPERM... or fails the connect).

usage: tls.py SOCKET CERTS_DIR IMAGE
"""

import nbd

from nbdtest import eq, log, read_file, run, check


def main(socket, certs, image):
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(certs)
    h.set_export_name("disk")
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_unix(socket)
    eq(h.get_tls_negotiated(), True, "TLS negotiated")
    eq(h.get_size(), 4 << 20, "export size")
    eq(h.pread(1 << 20, 0), read_file(image, 0, 1 << 20), "read over TLS")
    data = bytes(range(256)) * 256
    h.pwrite(data, 2 << 20, nbd.CMD_FLAG_FUA)
    eq(h.pread(len(data), 2 << 20), data, "read back over TLS")
    h.flush()
    h.shutdown()
    eq(read_file(image, 2 << 20, len(data)), data, "write reached the file")

    # Plaintext: refused with a message naming TLS.
    p = nbd.NBD()
    p.set_tls(nbd.TLS_DISABLE)
    p.set_export_name("disk")
    try:
        p.connect_unix(socket)
    except nbd.Error as e:
        check("tls" in (e.string or "").lower(),
              f"plaintext refusal should name TLS: {e.string!r}")
        log(f"ok: plaintext refused: {e.string}")
    else:
        raise AssertionError("a plaintext client was served under --tls require")
    log("ok: TLS over a unix socket")


run(main)
