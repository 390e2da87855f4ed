"""Helpers shared by the engine test scripts: the real oVirt SDK
(ovirtsdk4) used as the oVirt documentation examples use it."""

import sys
import time

import ovirtsdk4 as sdk
import ovirtsdk4.types as types

DEADLINE = 30.0


def connect(url, password_file):
    with open(password_file) as f:
        password = f.read().strip()
    return sdk.Connection(
        url=url,
        username="admin@internal",
        password=password,
        insecure=True,
    )


def host_by_name(connection, name):
    for host in connection.system_service().hosts_service().list():
        if host.name == name:
            return host
    raise AssertionError("no host named %r" % name)


def add_disk(connection, name, size, fmt=types.DiskFormat.RAW):
    disks_service = connection.system_service().disks_service()
    disk = disks_service.add(
        types.Disk(
            name=name,
            format=fmt,
            provisioned_size=size,
            storage_domains=[types.StorageDomain(name="data")],
        )
    )
    disk_service = disks_service.disk_service(disk.id)
    wait(lambda: disk_service.get().status == types.DiskStatus.OK, "disk ok")
    return disk


def wait(cond, what, deadline=DEADLINE):
    end = time.monotonic() + deadline
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for %s" % what)
        time.sleep(0.1)


def wait_phase_not(transfer_service, phases, deadline=DEADLINE):
    """Poll until the phase leaves `phases`; the transfer then."""
    end = time.monotonic() + deadline
    transfer = transfer_service.get()
    while transfer.phase in phases:
        if time.monotonic() > end:
            raise AssertionError("still %s after %ss" % (transfer.phase, deadline))
        time.sleep(0.1)
        transfer = transfer_service.get()
    return transfer


def wait_phase(transfer_service, phase, deadline=DEADLINE):
    """Poll until the phase is `phase`; fail on any end phase but it."""
    end = time.monotonic() + deadline
    while True:
        transfer = transfer_service.get()
        if transfer.phase == phase:
            return transfer
        if transfer.phase in (
            types.ImageTransferPhase.FINISHED_SUCCESS,
            types.ImageTransferPhase.FINISHED_FAILURE,
        ):
            raise AssertionError("ended %s, wanted %s" % (transfer.phase, phase))
        if time.monotonic() > end:
            raise AssertionError("still %s, wanted %s" % (transfer.phase, phase))
        time.sleep(0.1)


def expect_error(cls, code, fn, text=None):
    try:
        fn()
    except cls as e:
        assert e.code == code, "code %r, wanted %r: %s" % (e.code, code, e)
        if text is not None:
            assert text in str(e), "%r not in %r" % (text, str(e))
        return e
    raise AssertionError("no %s raised" % cls.__name__)


def ok(name):
    print("OK " + name)
    sys.stdout.flush()


def put_bytes(transfer_url, data, offset=0):
    """PUT raw bytes to the data server (the way the imageio client writes,
    but without converting the source image: the bytes land as they are)."""
    import http.client
    from urllib.parse import urlparse
    u = urlparse(transfer_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        headers = {"Content-Length": str(len(data))}
        if offset or len(data):
            headers["Content-Range"] = "bytes %d-%d/*" % (
                offset, offset + len(data) - 1)
        conn.request("PUT", u.path + "?flush=y", body=data, headers=headers)
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200, "PUT %d: %r" % (r.status, body)
    finally:
        conn.close()


def get_bytes(transfer_url):
    import http.client
    from urllib.parse import urlparse
    u = urlparse(transfer_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request("GET", u.path)
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200, "GET %d: %r" % (r.status, body)
        return body
    finally:
        conn.close()
