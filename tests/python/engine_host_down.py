"""A host whose data server is down: uploads end paused_system, resume
cannot bring them back, cancel removes the disk.

usage:
  engine_host_down.py API_URL PASSWORD_FILE never HOST_NAME WORK_DIR
      the host's data server never ran: the upload never starts
  engine_host_down.py API_URL PASSWORD_FILE start HOST_NAME WORK_DIR
      an upload transferring on the host (the test then kills its daemon)
  engine_host_down.py API_URL PASSWORD_FILE finish HOST_NAME WORK_DIR
      after the kill: paused_system, resume fails, cancel
"""

import os
import sys

import ovirtsdk4 as sdk
import ovirtsdk4.types as types

from engine_common import (add_disk, connect, expect_error, host_by_name, ok,
                           wait_phase, wait_phase_not)

url, password_file, mode, host_name, work = sys.argv[1:6]
SIZE = 4 * 1024 * 1024
P = types.ImageTransferPhase
ids = os.path.join(work, "down-ids")


def cancel_removes_the_disk(connection, ts, disk_id):
    ts.cancel()
    wait_phase(ts, P.FINISHED_FAILURE)
    disks = connection.system_service().disks_service()
    expect_error(sdk.NotFoundError, 404, disks.disk_service(disk_id).get)


with connect(url, password_file) as connection:
    transfers_service = connection.system_service().image_transfers_service()
    host = host_by_name(connection, host_name)
    if mode in ("never", "start"):
        disk = add_disk(connection, "down-" + mode, SIZE)
        transfer = transfers_service.add(types.ImageTransfer(
            disk=types.Disk(id=disk.id), host=types.Host(id=host.id)))
        ts = transfers_service.image_transfer_service(transfer.id)
        t = wait_phase_not(ts, [P.INITIALIZING])
        if mode == "never":
            assert t.phase == P.PAUSED_SYSTEM, t.phase
            assert t.transfer_url is None, t.transfer_url
            cancel_removes_the_disk(connection, ts, disk.id)
            ok("host never up paused_system")
        else:
            assert t.phase == P.TRANSFERRING, t.phase
            with open(ids, "w") as f:
                f.write("%s %s\n" % (disk.id, transfer.id))
            ok("transferring")
    else:
        with open(ids) as f:
            disk_id, transfer_id = f.read().split()
        ts = transfers_service.image_transfer_service(transfer_id)
        wait_phase(ts, P.PAUSED_SYSTEM)
        disk = connection.system_service().disks_service() \
            .disk_service(disk_id).get()
        assert disk.status == types.DiskStatus.LOCKED, disk.status
        ok("host died paused_system")
        ts.resume()
        t = wait_phase_not(ts, [P.RESUMING])
        assert t.phase == P.PAUSED_SYSTEM, t.phase
        ok("resume on a dead host paused_system")
        cancel_removes_the_disk(connection, ts, disk_id)
        ok("cancel removes the disk")
print("DONE")
