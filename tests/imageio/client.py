"""Drive the real ovirt-imageio Python client for the integration tests.

usage: client.py upload FILE URL
       client.py download URL FILE FORMAT
       client.py checksum FILE          (local image, blkhash like the server)
       client.py extents URL            (the server's zero extents, JSON)
       client.py info URL               (size, max_readers, max_writers, JSON)
"""

import json
import sys

from ovirt_imageio import client


def main(cmd, *args):
    if cmd == "upload":
        filename, url = args
        client.upload(filename, url, None, secure=False)
    elif cmd == "download":
        url, filename, fmt = args
        client.download(url, filename, None, fmt=fmt, secure=False)
    elif cmd == "checksum":
        (filename,) = args
        print(json.dumps(client.checksum(filename)))
    elif cmd == "extents":
        (url,) = args
        with client.ImageioClient(url, secure=False) as c:
            exts = [{"start": e.start, "length": e.length, "zero": e.zero,
                     "hole": e.hole} for e in c.extents()]
        print(json.dumps(exts))
    elif cmd == "info":
        (url,) = args
        with client.ImageioClient(url, secure=False) as c:
            print(json.dumps({"size": c.size(), "max_readers": c.max_readers,
                              "max_writers": c.max_writers}))
    else:
        sys.exit("unknown command: " + cmd)


if __name__ == "__main__":
    main(*sys.argv[1:])
