# Many small sequential writes in flight at once through
# `nbdbridge serve --imageio-url` (so they are coalesced), while a proxy
# fails one PUT. Prints one line per write: "INDEX ERRNO" (0 = ok).
#
# usage: coalesce_fault.py NBD-URI COUNT CHUNK
import errno
import sys

import nbd

uri, count, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([i % 250 + 1]) * chunk), i * chunk)
           for i in range(count)]
results = {}
while len(results) < count:
    for i, c in enumerate(cookies):
        if i in results:
            continue
        try:
            if h.aio_command_completed(c):
                results[i] = 0
        except nbd.Error as e:
            # libnbd gives the errno's name ("EIO"); print its number.
            code = e.errno
            if isinstance(code, str):
                code = getattr(errno, code, -1)
            results[i] = code or -1
    if len(results) < count:
        h.poll(-1)
for i in range(count):
    print(i, results[i])
h.shutdown()
