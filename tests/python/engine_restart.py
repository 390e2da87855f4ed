"""Restart: `start` leaves two uploads transferring with half the data
written (a raw disk, and a cow disk written as guest data through the
engine's qemu-nbd); `finish` (after the engine restarted on the same data
dir) finds the transfers and disks, writes the rest, finalizes, and
checks the data by downloading it.

usage: engine_restart.py API_URL PASSWORD_FILE start|finish WORK_DIR
"""

import os
import sys

import ovirtsdk4.types as types
from ovirt_imageio import client

from engine_common import (add_disk, connect, ok, put_bytes, wait_phase,
                           wait_phase_not)

url, password_file, mode, work = sys.argv[1:5]
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
        with open(src, "rb") as f:
            half = f.read(HALF)
        lines = []
        for name, fmt in (("restart-raw", types.DiskFormat.RAW),
                          ("restart-cow", types.DiskFormat.COW)):
            disk = add_disk(connection, name, SIZE, fmt=fmt)
            transfer = transfers_service.add(types.ImageTransfer(
                disk=types.Disk(id=disk.id), format=types.DiskFormat.RAW))
            ts = transfers_service.image_transfer_service(transfer.id)
            transfer = wait_phase_not(ts, [P.INITIALIZING])
            assert transfer.phase == P.TRANSFERRING, transfer.phase
            put_bytes(transfer.transfer_url, half)
            lines.append("%s %s\n" % (disk.id, transfer.id))
        with open(ids, "w") as f:
            f.writelines(lines)
        ok("started")
    else:
        with open(src, "rb") as f:
            data = f.read()
        with open(ids) as f:
            pairs = [line.split() for line in f]
        for disk_id, transfer_id in pairs:
            ts = transfers_service.image_transfer_service(transfer_id)
            transfer = ts.get()
            assert transfer.phase == P.TRANSFERRING, transfer.phase
            disk = system.disks_service().disk_service(disk_id).get()
            assert disk.status == types.DiskStatus.LOCKED, disk.status
            put_bytes(transfer.transfer_url, data[HALF:], offset=HALF)
            ts.finalize()
            wait_phase(ts, P.FINISHED_SUCCESS)
            t = transfers_service.add(types.ImageTransfer(
                disk=types.Disk(id=disk_id), format=types.DiskFormat.RAW,
                direction=types.ImageTransferDirection.DOWNLOAD))
            ts = transfers_service.image_transfer_service(t.id)
            t = wait_phase_not(ts, [P.INITIALIZING])
            dst = os.path.join(work, "dst.raw")
            client.download(t.transfer_url, dst, None, fmt="raw", secure=False)
            with open(dst, "rb") as f:
                assert f.read() == data, "data differs after restart"
            ts.finalize()
            wait_phase(ts, P.FINISHED_SUCCESS)
            ok("finished after restart: %s" % disk.format)
print("DONE")
