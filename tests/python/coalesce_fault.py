# Many small sequential writes in flight at once through
# `nbdbridge serve --imageio-url` (so they are coalesced), while a proxy
# fails one PUT. Prints one line per write: "INDEX ERRNO" (0 = ok).
#
# usage: coalesce_fault.py NBD-URI COUNT CHUNK
import sys

import nbd

from nbdtest import wait_all

uri, count, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([i % 250 + 1]) * chunk), i * chunk)
           for i in range(count)]
results = wait_all(h, cookies)
for i in range(count):
    print(i, results[i])
h.shutdown()
