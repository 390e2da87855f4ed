"""Restart: `start` leaves an upload transferring with half the data
written; `finish` (after the engine restarted on the same data dir)
finds the transfer and disk, writes the rest, finalizes, and checks the
data by downloading it.

usage: engine_restart.py start|finish API_URL PASSWORD_FILE WORK_DIR
"""

import os
import sys

import ovirtsdk4.types as types
from ovirt_imageio import client

from engine_common import (add_disk, connect, ok, put_bytes, wait_phase,
                           wait_phase_not)

mode, url, password_file, work = sys.argv[1:5]
SIZE = 4 * 1024 * 1024
HALF = SIZE // 2
P = types.ImageTransferPhase
src = os.path.join(work, "src.raw")
ids = os.path.join(work, "ids")

with connect(url, password_file) as connection:
    system = connection.system_service()
    transfers_service = system.image_transfers_service()
    if mode == "start":
        with open(src, "wb") as f:
            f.write(os.urandom(SIZE))
        disk = add_disk(connection, "restart", SIZE)
        transfer = transfers_service.add(types.ImageTransfer(
            disk=types.Disk(id=disk.id)))
        ts = transfers_service.image_transfer_service(transfer.id)
        transfer = wait_phase_not(ts, [P.INITIALIZING])
        assert transfer.phase == P.TRANSFERRING, transfer.phase
        with open(src, "rb") as f:
            put_bytes(transfer.transfer_url, f.read(HALF))
        with open(ids, "w") as f:
            f.write("%s %s\n" % (disk.id, transfer.id))
        ok("started")
    else:
        with open(ids) as f:
            disk_id, transfer_id = f.read().split()
        ts = transfers_service.image_transfer_service(transfer_id)
        transfer = ts.get()
        assert transfer.phase == P.TRANSFERRING, transfer.phase
        disk = system.disks_service().disk_service(disk_id).get()
        assert disk.status == types.DiskStatus.LOCKED, disk.status
        with open(src, "rb") as f:
            data = f.read()
        put_bytes(transfer.transfer_url, data[HALF:], offset=HALF)
        ts.finalize()
        wait_phase(ts, P.FINISHED_SUCCESS)
        t = transfers_service.add(types.ImageTransfer(
            disk=types.Disk(id=disk_id),
            direction=types.ImageTransferDirection.DOWNLOAD))
        ts = transfers_service.image_transfer_service(t.id)
        t = wait_phase_not(ts, [P.INITIALIZING])
        dst = os.path.join(work, "dst.raw")
        client.download(t.transfer_url, dst, None, fmt="raw", secure=False)
        with open(dst, "rb") as f:
            assert f.read() == data, "data differs after restart"
        ts.finalize()
        wait_phase(ts, P.FINISHED_SUCCESS)
        ok("finished after restart")
print("DONE")
