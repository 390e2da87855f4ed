"""Restart: `start` leaves uploads transferring with half their data
written; `finish` (after the engine restarted on the same data dir) finds
the transfers and disks, writes the rest, finalizes, and checks the data
by downloading it.

Each CASE is DISK_FORMAT:TRANSFER_FORMAT:
  raw:raw  a raw disk, its bytes through a file ticket
  cow:cow  a cow disk, its QCOW2 bytes through a file ticket
  cow:raw  a cow disk, guest data through the engine's qemu-nbd

usage: engine_restart.py API_URL PASSWORD_FILE start|finish HOST_NAME WORK_DIR CASE...
"""

import os
import subprocess
import sys

import ovirtsdk4.types as types
from ovirt_imageio import client

from engine_common import (add_disk, connect, get_bytes, host_by_name, ok,
                           put_bytes, wait_phase, wait_phase_not)

url, password_file, mode, host_name, work = sys.argv[1:6]
cases = sys.argv[6:]
SIZE = 4 * 1024 * 1024
P = types.ImageTransferPhase
FORMATS = {"raw": types.DiskFormat.RAW, "cow": types.DiskFormat.COW}


def source(case):
    """The bytes `case` uploads (made by `start`, kept in WORK_DIR)."""
    path = os.path.join(work, "src-" + case.replace(":", "-"))
    if not os.path.exists(path):
        if case == "cow:cow":
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path,
                            str(SIZE)], check=True)
            for offset, pattern in (("0", "0x11"), ("3M", "0x22")):
                subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                                "write -P %s %s 256k" % (pattern, offset),
                                path], check=True, stdout=subprocess.DEVNULL)
        else:
            with open(path, "wb") as f:
                f.write(os.urandom(SIZE))
    with open(path, "rb") as f:
        return f.read()


def half(data):
    """Where `start` stops writing: the middle, 4 KiB aligned."""
    return len(data) // 2 // 4096 * 4096


with connect(url, password_file) as connection:
    system = connection.system_service()
    transfers_service = system.image_transfers_service()
    host = host_by_name(connection, host_name)
    if mode == "start":
        lines = []
        for case in cases:
            disk_fmt, transfer_fmt = case.split(":")
            data = source(case)
            disk = add_disk(connection, "restart-" + case, SIZE,
                            fmt=FORMATS[disk_fmt])
            transfer = transfers_service.add(types.ImageTransfer(
                disk=types.Disk(id=disk.id), host=types.Host(id=host.id),
                format=FORMATS[transfer_fmt]))
            ts = transfers_service.image_transfer_service(transfer.id)
            transfer = wait_phase_not(ts, [P.INITIALIZING])
            assert transfer.phase == P.TRANSFERRING, transfer.phase
            put_bytes(transfer.transfer_url, data[:half(data)])
            lines.append("%s %s %s\n" % (case, disk.id, transfer.id))
        with open(os.path.join(work, "ids"), "w") as f:
            f.writelines(lines)
        ok("started")
    else:
        with open(os.path.join(work, "ids")) as f:
            rows = [line.split() for line in f]
        for case, disk_id, transfer_id in rows:
            transfer_fmt = FORMATS[case.split(":")[1]]
            data = source(case)
            ts = transfers_service.image_transfer_service(transfer_id)
            transfer = ts.get()
            assert transfer.phase == P.TRANSFERRING, transfer.phase
            disk = system.disks_service().disk_service(disk_id).get()
            assert disk.status == types.DiskStatus.LOCKED, disk.status
            put_bytes(transfer.transfer_url, data[half(data):],
                      offset=half(data))
            ts.finalize()
            wait_phase(ts, P.FINISHED_SUCCESS)
            t = transfers_service.add(types.ImageTransfer(
                disk=types.Disk(id=disk_id), host=types.Host(id=host.id),
                format=transfer_fmt,
                direction=types.ImageTransferDirection.DOWNLOAD))
            ts = transfers_service.image_transfer_service(t.id)
            t = wait_phase_not(ts, [P.INITIALIZING])
            assert t.phase == P.TRANSFERRING, t.phase
            if transfer_fmt == types.DiskFormat.RAW:
                dst = os.path.join(work, "dst.raw")
                client.download(t.transfer_url, dst, None, fmt="raw",
                                secure=False)
                with open(dst, "rb") as f:
                    got = f.read()
                assert got == data, "data differs after restart"
            else:
                # The QCOW2 file itself; the daemon's O_DIRECT file backend
                # may pad it with zeros to its block size.
                got = get_bytes(t.transfer_url)
                pad = len(got) - len(data)
                assert got[:len(data)] == data, "qcow2 differs after restart"
                assert 0 <= pad < 4096, (len(got), len(data))
                assert got[len(data):] == bytes(pad), "padding not zero"
            ts.finalize()
            wait_phase(ts, P.FINISHED_SUCCESS)
            ok("finished after restart: " + case)
print("DONE")
