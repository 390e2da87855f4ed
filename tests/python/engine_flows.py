"""Upload, pause/resume, finalize, download, cancel and error cases with
the real SDK, data moved by the real imageio client.

usage: engine_flows.py API_URL PASSWORD_FILE HOST_NAME WORK_DIR
"""

import os
import sys

import ovirtsdk4 as sdk
import ovirtsdk4.types as types
from ovirt_imageio import client

from engine_common import (add_disk, connect, expect_error, host_by_name, ok,
                           wait, wait_phase, wait_phase_not)

url, password_file, host_name, work = sys.argv[1:5]
SIZE = 8 * 1024 * 1024
P = types.ImageTransferPhase

src = os.path.join(work, "src.raw")
with open(src, "wb") as f:
    f.write(os.urandom(1024 * 1024))
    f.seek(5 * 1024 * 1024)
    f.write(os.urandom(512 * 1024))
    f.truncate(SIZE)

with connect(url, password_file) as connection:
    system = connection.system_service()
    api = system.get()
    assert api.product_info.version.major == 4, api.product_info.version
    domains = system.storage_domains_service().list()
    assert [d.name for d in domains] == ["data"], domains
    host = host_by_name(connection, host_name)

    # Upload: the example "add(ImageTransfer(disk=Disk(id=...)))".
    disk = add_disk(connection, "flows-upload", SIZE)
    transfers_service = system.image_transfers_service()
    transfer = transfers_service.add(types.ImageTransfer(disk=types.Disk(id=disk.id)))
    assert transfer.phase == P.INITIALIZING, transfer.phase
    assert transfer.direction == types.ImageTransferDirection.UPLOAD
    transfer_service = transfers_service.image_transfer_service(transfer.id)
    transfer = wait_phase_not(transfer_service, [P.INITIALIZING])
    assert transfer.phase == P.TRANSFERRING, transfer.phase
    assert transfer.transfer_url.startswith("http://"), transfer.transfer_url
    assert transfer.host.id == host.id
    ok("upload transferring")

    followed = transfer_service.get(follow="disk")
    assert followed.disk.status == types.DiskStatus.LOCKED, followed.disk.status
    assert followed.disk.provisioned_size == SIZE
    both = transfer_service.get(follow="disk,host")
    assert both.host.name == host_name, both.host.name
    assert both.disk.name == "flows-upload", both.disk.name
    ok("follow disk: locked")

    # One transfer per disk.
    expect_error(sdk.Error, 409, lambda: transfers_service.add(
        types.ImageTransfer(disk=types.Disk(id=disk.id))))
    # A locked disk cannot be removed.
    expect_error(sdk.Error, 409,
                 lambda: system.disks_service().disk_service(disk.id).remove())
    ok("disk locked")

    transfer_service.extend()
    transfer_service.pause()
    assert transfer_service.get().phase == P.PAUSED_USER
    expect_error(sdk.Error, 409, transfer_service.finalize, "in phase paused_user")
    transfer_service.resume()
    transfer = wait_phase_not(transfer_service, [P.RESUMING])
    assert transfer.phase == P.TRANSFERRING, transfer.phase
    ok("pause resume")

    client.upload(src, transfer.transfer_url, None, secure=False)
    # The engine reports the bytes the data server counted.
    wait(lambda: transfer_service.get().transferred > 0, "transferred > 0")
    ok("transferred reported")
    transfer_service.finalize()
    transfer = wait_phase_not(transfer_service, [P.TRANSFERRING, P.FINALIZING_SUCCESS])
    assert transfer.phase == P.FINISHED_SUCCESS, transfer.phase
    disk_service = system.disks_service().disk_service(disk.id)
    assert disk_service.get().status == types.DiskStatus.OK
    ok("upload finished_success")

    # Wrong-phase action on a finished transfer: 409 with a fault.
    e = expect_error(sdk.Error, 409, transfer_service.pause,
                     "in phase finished_success")
    assert e.fault.reason == "Operation Failed", e.fault.reason
    ok("pause finished 409")

    # Download on a given host.
    transfer = transfers_service.add(types.ImageTransfer(
        disk=types.Disk(id=disk.id),
        host=types.Host(id=host.id),
        direction=types.ImageTransferDirection.DOWNLOAD,
    ))
    transfer_service = transfers_service.image_transfer_service(transfer.id)
    transfer = wait_phase_not(transfer_service, [P.INITIALIZING])
    assert transfer.phase == P.TRANSFERRING, transfer.phase
    expect_error(sdk.Error, 400, transfer_service.pause, "cannot be paused")
    dst = os.path.join(work, "dst.raw")
    client.download(transfer.transfer_url, dst, None, fmt="raw", secure=False)
    with open(src, "rb") as a, open(dst, "rb") as b:
        assert a.read() == b.read(), "downloaded data differs"
    transfer_service.finalize()
    transfer = wait_phase(transfer_service, P.FINISHED_SUCCESS)
    assert disk_service.get().status == types.DiskStatus.OK
    ok("download bit-exact")

    # Cancel an upload: the disk is removed.
    disk2 = add_disk(connection, "flows-cancel", SIZE)
    transfer = transfers_service.add(types.ImageTransfer(
        disk=types.Disk(id=disk2.id), host=types.Host(id=host.id)))
    transfer_service = transfers_service.image_transfer_service(transfer.id)
    transfer = wait_phase_not(transfer_service, [P.INITIALIZING])
    assert transfer.phase == P.TRANSFERRING, transfer.phase
    transfer_service.cancel()
    seen = set()

    def ended():
        t = transfer_service.get()
        seen.add(t.phase)
        return t.phase == P.FINISHED_FAILURE
    wait(ended, "finished_failure after cancel")
    assert P.CANCELLED_USER in seen or P.FINALIZING_CLEANUP in seen or \
        P.FINISHED_CLEANUP in seen, seen
    expect_error(sdk.NotFoundError, 404,
                 system.disks_service().disk_service(disk2.id).get)
    ok("cancel removes the disk")

    # Errors.
    bogus = "00000000-0000-4000-8000-000000000bad"
    expect_error(sdk.NotFoundError, 404, lambda: transfers_service.add(
        types.ImageTransfer(disk=types.Disk(id=bogus))), "Entity not found")
    expect_error(sdk.NotFoundError, 404,
                 transfers_service.image_transfer_service(bogus).get)
    expect_error(sdk.NotFoundError, 404,
                 transfers_service.image_transfer_service(bogus).finalize)
    expect_error(sdk.Error, 400, lambda: transfers_service.add(
        types.ImageTransfer(disk=types.Disk(id=disk.id), inactivity_timeout=-1)))
    expect_error(sdk.Error, 400, lambda: system.disks_service().add(
        types.Disk(name="x", format=types.DiskFormat.RAW)), "provisioned_size")
    listed = [t.id for t in transfers_service.list()]
    assert transfer.id in listed, listed
    ok("errors")

    system.disks_service().disk_service(disk.id).remove()
    expect_error(sdk.NotFoundError, 404, disk_service.get)
    ok("disk removed")

# A wrong password is an AuthError.
bad = sdk.Connection(url=url, username="admin@internal", password="nope",
                     insecure=True)
try:
    bad.system_service().disks_service().list()
    raise AssertionError("a wrong password was accepted")
except sdk.AuthError as e:
    assert "Cannot authenticate" in str(e), str(e)
ok("auth")
print("DONE")
