"""System phases: inactivity with timeout_policy cancel / legacy; ticket
renewal. The engine runs with --ticket-timeout 3. (A host that is down:
engine_host_down.py.)

usage: engine_system.py API_URL PASSWORD_FILE HOST_NAME WORK_DIR
"""

import os
import sys
import time

import ovirtsdk4 as sdk
import ovirtsdk4.types as types
from ovirt_imageio import client

from engine_common import (add_disk, connect, expect_error, host_by_name, ok,
                           put_bytes, wait_phase, wait_phase_not)

url, password_file, host_name, work = sys.argv[1:5]
SIZE = 4 * 1024 * 1024
P = types.ImageTransferPhase

src = os.path.join(work, "src.raw")
data = os.urandom(SIZE)
with open(src, "wb") as f:
    f.write(data)


def start(connection, name, **kw):
    system = connection.system_service()
    disk = add_disk(connection, name, SIZE)
    transfers_service = system.image_transfers_service()
    transfer = transfers_service.add(types.ImageTransfer(
        disk=types.Disk(id=disk.id), **kw))
    transfer_service = transfers_service.image_transfer_service(transfer.id)
    return disk, transfer_service


with connect(url, password_file) as connection:
    disks = connection.system_service().disks_service()
    up = host_by_name(connection, host_name)

    disk, ts = start(connection, "system-cancel", host=types.Host(id=up.id),
                     inactivity_timeout=1,
                     timeout_policy=types.ImageTransferTimeoutPolicy.CANCEL)
    t = wait_phase_not(ts, [P.INITIALIZING])
    assert t.phase == P.TRANSFERRING, t.phase
    assert t.inactivity_timeout == 1
    wait_phase(ts, P.FINISHED_FAILURE)
    expect_error(sdk.NotFoundError, 404, disks.disk_service(disk.id).get)
    ok("inactivity cancel")

    # After the resume below the upload must start within the 5 s: one PUT
    # from memory (the imageio client first starts qemu-nbd for its
    # source, which takes longer than that on a loaded machine).
    disk, ts = start(connection, "system-legacy", host=types.Host(id=up.id),
                     inactivity_timeout=5)
    wait_phase(ts, P.PAUSED_SYSTEM)
    assert disks.disk_service(disk.id).get().status == types.DiskStatus.LOCKED
    ok("inactivity legacy upload paused_system")
    # Resume, then keep it busy: upload and finalize.
    ts.resume()
    t = wait_phase_not(ts, [P.PAUSED_SYSTEM, P.RESUMING])
    assert t.phase == P.TRANSFERRING, t.phase
    put_bytes(t.transfer_url, data)
    ts.finalize()
    wait_phase(ts, P.FINISHED_SUCCESS)
    ok("resume after paused_system")

    # A download left idle (legacy policy) is cancelled by the system; the
    # disk stays.
    t = connection.system_service().image_transfers_service().add(
        types.ImageTransfer(disk=types.Disk(id=disk.id), inactivity_timeout=1,
                            host=types.Host(id=up.id),
                            direction=types.ImageTransferDirection.DOWNLOAD))
    ts = connection.system_service().image_transfers_service() \
        .image_transfer_service(t.id)
    wait_phase(ts, P.FINISHED_FAILURE)
    assert disks.disk_service(disk.id).get().status == types.DiskStatus.OK
    ok("inactivity legacy download cancelled")

    # Ticket renewal: ticket timeout is 3 s, inactivity checks off; after
    # 8 s without data requests the ticket still works.
    disk, ts = start(connection, "system-renew", host=types.Host(id=up.id),
                     inactivity_timeout=0)
    t = wait_phase_not(ts, [P.INITIALIZING])
    assert t.phase == P.TRANSFERRING, t.phase
    time.sleep(8)  # the thing under test is the passing of time
    t = ts.get()
    assert t.phase == P.TRANSFERRING, t.phase
    client.upload(src, t.transfer_url, None, secure=False)
    ts.finalize()
    wait_phase(ts, P.FINISHED_SUCCESS)
    ok("ticket renewed")
print("DONE")
