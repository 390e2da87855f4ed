# Writes through `nbdbridge serve --imageio-url` that exercise write
# coalescing: many small writes in flight at once from two connections
# (meeting each other), FUA writes, FLUSH, writes over acknowledged data,
# unaligned chains, zeroes. Keeps a byte model, reads everything back over
# NBD and compares; saves the model to MODEL for a byte comparison of the
# image itself.
#
# usage: coalesce_mix.py NBD-URI SIZE MODEL
import sys

import nbd

from nbdtest import wait_all

uri, size, model_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
K = 64 * 1024
model = bytearray(size)


def fill(seed, n):
    unit = bytes((seed * 131 + i * 7) % 251 + 1 for i in range(4096))
    return (unit * (n // 4096 + 1))[:n]


def connect():
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def aio_writes(h, writes):
    """Send every (offset, data, flags) at once, then wait; all must pass."""
    cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(d)), off, flags=fl)
               for off, d, fl in writes]
    res = wait_all(h, cookies)
    bad = {i: e for i, e in res.items() if e}
    if bad:
        sys.exit("writes failed: %r" % bad)
    for off, d, _ in writes:
        model[off:off + len(d)] = d


a, b = connect(), connect()
FUA = nbd.CMD_FLAG_FUA

# The model starts from what the image holds (earlier clients wrote it).
for off in range(0, size, 4 << 20):
    n = min(4 << 20, size - off)
    model[off:off + n] = a.pread(n, off)

# 1. A sequential stream of 64 KiB writes, all in flight, every 16th FUA.
aio_writes(a, [(i * K, fill(i, K), FUA if i % 16 == 15 else 0) for i in range(96)])
a.flush()

# 2. Two connections meeting: even chunks from one, odd from the other,
#    all in flight at once.
base = 8 << 20
ca = [a.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(fill(100 + i, K))), base + i * K)
      for i in range(0, 64, 2)]
cb = [b.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(fill(100 + i, K))), base + i * K)
      for i in range(1, 64, 2)]
for h, cs in ((a, ca), (b, cb)):
    res = wait_all(h, cs)
    if any(res.values()):
        sys.exit("meeting writes failed: %r" % res)
for i in range(64):
    model[base + i * K:base + (i + 1) * K] = fill(100 + i, K)
b.flush()

# 3. Overwrites of acknowledged data: each waits for the one before.
for n, (off, ln, fl) in enumerate([(K // 2, 3 * K, 0), (K, K, FUA), (K + 100, 5000, 0),
                                   (base - 4096, 8192, FUA)]):
    d = fill(200 + n, ln)
    a.pwrite(d, off, flags=fl)
    model[off:off + ln] = d

# 4. An unaligned chain of odd sizes, all in flight, the last one FUA.
off, chain = 12 << 20, []
for n in range(200):
    ln = 1 + (n * 977) % 9000
    chain.append((off, fill(300 + n, ln), FUA if n == 199 else 0))
    off += ln
aio_writes(b, chain)

# 5. Zeroes over written data, then writes over the zeroes.
a.zero(2 * K + 17, 3 * K)  # count, offset
model[3 * K:5 * K + 17] = bytes(2 * K + 17)
aio_writes(a, [(4 * K + i * 4096, fill(400 + i, 4096), 0) for i in range(8)])
a.flush()
b.flush()

# Read back over NBD, then save the model.
for h in (a, b):
    step = 4 << 20
    for off in range(0, size, step):
        n = min(step, size - off)
        got = h.pread(n, off)
        if got != model[off:off + n]:
            first = next(i for i in range(n) if got[i] != model[off + i])
            sys.exit("read back differs at byte %d" % (off + first))
with open(model_path, "wb") as f:
    f.write(model)
a.shutdown()
b.shutdown()
print("ok")
