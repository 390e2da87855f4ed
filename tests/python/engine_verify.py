"""Finalize verification of cow (QCOW2) uploads: a real QCOW2 image ends
finished_success; raw bytes or a QCOW2 with a backing file end
finished_failure with the disk removed.

usage: engine_verify.py API_URL PASSWORD_FILE HOST_NAME WORK_DIR
"""

import os
import subprocess
import sys

import ovirtsdk4 as sdk
import ovirtsdk4.types as types

from engine_common import (add_disk, connect, expect_error, get_bytes,
                           host_by_name, ok, put_bytes, wait_phase,
                           wait_phase_not)

url, password_file, host_name, work = sys.argv[1:5]
SIZE = 16 * 1024 * 1024
P = types.ImageTransferPhase


def qcow2(name, backing=None):
    path = os.path.join(work, name)
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        cmd += ["-b", backing, "-F", "raw"]
    cmd += [path, str(SIZE)]
    subprocess.run(cmd, check=True)
    # Some guest data, so the image has clusters.
    subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                    "write -P 0x5a 1M 64k", path], check=True,
                   stdout=subprocess.DEVNULL)
    with open(path, "rb") as f:
        return f.read()


def upload(connection, name, data):
    system = connection.system_service()
    disk = add_disk(connection, name, SIZE, fmt=types.DiskFormat.COW)
    transfers_service = system.image_transfers_service()
    transfer = transfers_service.add(types.ImageTransfer(
        disk=types.Disk(id=disk.id),
        host=types.Host(id=host_by_name(connection, host_name).id)))
    assert transfer.format == types.DiskFormat.COW, transfer.format
    transfer_service = transfers_service.image_transfer_service(transfer.id)
    transfer = wait_phase_not(transfer_service, [P.INITIALIZING])
    assert transfer.phase == P.TRANSFERRING, transfer.phase
    put_bytes(transfer.transfer_url, data)
    transfer_service.finalize()
    transfer = wait_phase_not(
        transfer_service,
        [P.TRANSFERRING, P.FINALIZING_SUCCESS, P.FINALIZING_FAILURE])
    return disk, transfer


with connect(url, password_file) as connection:
    disks = connection.system_service().disks_service()

    good = qcow2("good.qcow2")
    disk, transfer = upload(connection, "verify-good", good)
    assert transfer.phase == P.FINISHED_SUCCESS, transfer.phase
    assert disks.disk_service(disk.id).get().status == types.DiskStatus.OK
    ok("qcow2 finished_success")

    # Download the cow disk: the QCOW2 bytes come back as they were.
    transfers_service = connection.system_service().image_transfers_service()
    t = transfers_service.add(types.ImageTransfer(
        disk=types.Disk(id=disk.id),
        direction=types.ImageTransferDirection.DOWNLOAD))
    ts = transfers_service.image_transfer_service(t.id)
    t = wait_phase_not(ts, [P.INITIALIZING])
    assert t.phase == P.TRANSFERRING, t.phase
    got = get_bytes(t.transfer_url)
    # imageio's file backend writes whole blocks (O_DIRECT): an unaligned
    # image comes back padded with zeros to the block size.
    assert got[:len(good)] == good, "downloaded qcow2 differs"
    assert len(got) - len(good) < 4096, (len(got), len(good))
    assert got[len(good):] == bytes(len(got) - len(good)), "padding not zero"
    ts.finalize()
    wait_phase(ts, P.FINISHED_SUCCESS)
    ok("qcow2 download bit-exact")

    raw = os.urandom(1024 * 1024)
    disk, transfer = upload(connection, "verify-raw-bytes", raw)
    assert transfer.phase == P.FINISHED_FAILURE, transfer.phase
    expect_error(sdk.NotFoundError, 404, disks.disk_service(disk.id).get)
    ok("not qcow2 finished_failure")

    base = os.path.join(work, "base.raw")
    with open(base, "wb") as f:
        f.truncate(SIZE)
    disk, transfer = upload(connection, "verify-backing", qcow2("top.qcow2", base))
    assert transfer.phase == P.FINISHED_FAILURE, transfer.phase
    expect_error(sdk.NotFoundError, 404, disks.disk_service(disk.id).get)
    ok("backing file finished_failure")
print("DONE")
