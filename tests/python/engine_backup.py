"""VM backups through the real SDK, in the shape of the SDK's own example
(examples/backup_vm.py): a full backup, writes to the disk, an incremental
backup from the checkpoint downloaded with the real imageio client
(`incremental=True`) into a qcow2 overlay on the full backup; each restored
image is identical to the disk at its checkpoint (`qemu-img compare`).
Then checkpoint removal and the faults.

usage:
  engine_backup.py API_URL PASSWORD_FILE flow HOST_NAME WORK_DIR
  engine_backup.py API_URL PASSWORD_FILE start HOST_NAME WORK_DIR
      a backup left ready (the test then restarts the engine)
  engine_backup.py API_URL PASSWORD_FILE finish HOST_NAME WORK_DIR
      after the restart: the backup is still ready; download, finalize
"""

import os
import subprocess
import sys

import ovirtsdk4 as sdk
import ovirtsdk4.types as types
from ovirt_imageio import client

from engine_common import (connect, expect_error, host_by_name, ok, put_bytes,
                           wait, wait_phase)

url, password_file, mode, host_name, work = sys.argv[1:6]
SIZE = 4 * 1024 * 1024
P = types.ImageTransferPhase
B = types.BackupPhase
ids_file = os.path.join(work, "backup-ids")


def add_cow_disk(connection, name):
    disks = connection.system_service().disks_service()
    disk = disks.add(types.Disk(
        name=name,
        format=types.DiskFormat.COW,
        backup=types.DiskBackup.INCREMENTAL,
        provisioned_size=SIZE,
        storage_domains=[types.StorageDomain(name="data")],
    ))
    ds = disks.disk_service(disk.id)
    wait(lambda: ds.get().status == types.DiskStatus.OK, "disk ok")
    return ds.get()


def upload(connection, host, disk_id, writes):
    """Guest data to a cow disk through the engine (its qemu-nbd, so the
    disk's bitmaps see the writes)."""
    transfers = connection.system_service().image_transfers_service()
    t = transfers.add(types.ImageTransfer(
        disk=types.Disk(id=disk_id), host=types.Host(id=host.id),
        format=types.DiskFormat.RAW))
    ts = transfers.image_transfer_service(t.id)
    t = wait_phase(ts, P.TRANSFERRING)
    for offset, data in writes:
        put_bytes(t.transfer_url, data, offset)
    ts.finalize()
    wait_phase(ts, P.FINISHED_SUCCESS)
    ds = connection.system_service().disks_service().disk_service(disk_id)
    wait(lambda: ds.get().status == types.DiskStatus.OK, "disk ok")


def apply(ref, writes):
    for offset, data in writes:
        ref[offset:offset + len(data)] = data


def add_vm(connection, name, disk_id):
    vms = connection.system_service().vms_service()
    vm = vms.add(types.Vm(
        name=name,
        cluster=types.Cluster(name="Default"),
        template=types.Template(name="Blank"),
    ))
    assert vm.status == types.VmStatus.DOWN, vm.status
    vms.vm_service(vm.id).disk_attachments_service().add(types.DiskAttachment(
        disk=types.Disk(id=disk_id),
        interface=types.DiskInterface.VIRTIO_SCSI,
        bootable=False,
        active=True,
    ))
    return vm


def get_vm_disks(connection, vm_id):
    """As the SDK example: whole disks, found through the attachments."""
    system = connection.system_service()
    vm_service = system.vms_service().vm_service(vm_id)
    return [system.disks_service().disk_service(a.disk.id).get()
            for a in vm_service.disk_attachments_service().list()]


def start_backup(connection, vm_id, from_checkpoint=None):
    backups = connection.system_service().vms_service().vm_service(vm_id) \
        .backups_service()
    backup = backups.add(types.Backup(
        disks=get_vm_disks(connection, vm_id),
        from_checkpoint_id=from_checkpoint,
        description="test backup",
    ))
    bs = backups.backup_service(backup.id)
    wait(lambda: bs.get().phase == B.READY, "backup ready")
    return bs.get()


def backup_service(connection, backup):
    return connection.system_service().vms_service() \
        .vm_service(backup.vm.id).backups_service().backup_service(backup.id)


def download_backup(connection, host, backup, path, backing_file=None):
    """As download_backup + download_disk of the SDK example; the disk's
    backup mode."""
    bs = backup_service(connection, backup)
    (disk,) = bs.disks_service().list()
    incremental = disk.backup_mode == types.DiskBackupMode.INCREMENTAL
    transfers = connection.system_service().image_transfers_service()
    t = transfers.add(types.ImageTransfer(
        disk=types.Disk(id=disk.id),
        direction=types.ImageTransferDirection.DOWNLOAD,
        backup=types.Backup(id=backup.id),
        host=types.Host(id=host.id),
        timeout_policy=types.ImageTransferTimeoutPolicy.CANCEL,
        format=types.DiskFormat.RAW))
    ts = transfers.image_transfer_service(t.id)
    t = wait_phase(ts, P.TRANSFERRING)
    assert t.backup.id == backup.id, t.backup
    client.download(
        t.transfer_url, path, None, incremental=incremental, secure=False,
        backing_file=backing_file,
        backing_format="qcow2" if backing_file else None)
    ts.finalize()
    wait_phase(ts, P.FINISHED_SUCCESS)
    return disk.backup_mode


def stop_backup(connection, backup):
    bs = backup_service(connection, backup)
    bs.finalize()
    wait(lambda: bs.get().phase == B.SUCCEEDED, "backup succeeded")
    # Stopping again is harmless (the SDK example relies on it).
    bs.finalize()


def same(image, ref_bytes, name):
    raw = os.path.join(work, name + ".raw")
    with open(raw, "wb") as f:
        f.write(ref_bytes)
    r = subprocess.run(["qemu-img", "compare", "-q", image, raw])
    assert r.returncode == 0, "%s differs from the disk (%d)" % (image,
                                                                 r.returncode)


def top_layer_bytes(image):
    """Bytes the image's own layer holds (not its backing chain)."""
    import json
    out = subprocess.run(["qemu-img", "map", "--output=json", image],
                         check=True, capture_output=True, text=True).stdout
    return sum(e["length"] for e in json.loads(out)
               if e["data"] and e.get("depth", 0) == 0)


with connect(url, password_file) as connection:
    system = connection.system_service()
    host = host_by_name(connection, host_name)
    vms = system.vms_service()
    if mode == "flow":
        ref = bytearray(SIZE)
        first = [(0, b"\x11" * (1024 * 1024)), (3 * 1024 * 1024, b"\x22" * 65536)]
        disk = add_cow_disk(connection, "bk")
        assert disk.backup == types.DiskBackup.INCREMENTAL, disk.backup
        upload(connection, host, disk.id, first)
        apply(ref, first)
        vm = add_vm(connection, "vm1", disk.id)
        assert [d.id for d in get_vm_disks(connection, vm.id)] == [disk.id]
        ok("vm with disk")

        full = start_backup(connection, vm.id)
        assert full.to_checkpoint_id, full
        assert full.from_checkpoint_id is None
        ds = system.disks_service().disk_service(disk.id)
        assert ds.get().status == types.DiskStatus.LOCKED
        # A second backup of the VM while one runs: 409.
        expect_error(sdk.Error, 409, lambda: vms.vm_service(vm.id)
                     .backups_service().add(types.Backup(
                         disks=[types.Disk(id=disk.id)])), "in progress")
        full_path = os.path.join(work, "full.qcow2")
        mode1 = download_backup(connection, host, full, full_path)
        assert mode1 == types.DiskBackupMode.FULL, mode1
        stop_backup(connection, full)
        wait(lambda: ds.get().status == types.DiskStatus.OK, "disk unlocked")
        same(full_path, bytes(ref), "ref1")
        ok("full backup")

        second = [(512 * 1024, b"\x33" * 65536), (2 * 1024 * 1024, b"\x44" * 65536)]
        upload(connection, host, disk.id, second)
        apply(ref, second)
        incr = start_backup(connection, vm.id, full.to_checkpoint_id)
        assert incr.from_checkpoint_id == full.to_checkpoint_id, incr
        incr_path = os.path.join(work, "incr.qcow2")
        mode2 = download_backup(connection, host, incr, incr_path,
                                backing_file="full.qcow2")
        assert mode2 == types.DiskBackupMode.INCREMENTAL, mode2
        stop_backup(connection, incr)
        same(incr_path, bytes(ref), "ref2")
        # Only what changed came down: the two 64 KiB writes (a bitmap
        # granularity of 64 KiB), not the 1 MiB of the first upload.
        held = top_layer_bytes(incr_path)
        assert 0 < held <= 256 * 1024, held
        ok("incremental backup")

        cps = vms.vm_service(vm.id).checkpoints_service()
        listed = [c.id for c in cps.list()]
        assert listed == [full.to_checkpoint_id, incr.to_checkpoint_id], listed
        c2 = cps.checkpoint_service(incr.to_checkpoint_id).get()
        assert c2.parent_id == full.to_checkpoint_id, c2.parent_id
        assert c2.state == types.CheckpointState.CREATED, c2.state
        # Only the root checkpoint can go.
        expect_error(sdk.Error, 400, cps.checkpoint_service(
            incr.to_checkpoint_id).remove, "root")
        cps.checkpoint_service(full.to_checkpoint_id).remove()
        assert [c.id for c in cps.list()] == [incr.to_checkpoint_id]
        expect_error(sdk.NotFoundError, 404, cps.checkpoint_service(
            full.to_checkpoint_id).get)
        out = subprocess.run(["qemu-img", "info", "--output=json", "-U",
                              os.path.join(work, "..", "engine", "images",
                                           disk.id)],
                             capture_output=True, text=True)
        if out.returncode == 0:
            assert full.to_checkpoint_id not in out.stdout
        ok("checkpoint removed")

        # A backup from the removed checkpoint is refused clearly.
        expect_error(sdk.Error, 400, lambda: vms.vm_service(vm.id)
                     .backups_service().add(types.Backup(
                         disks=[types.Disk(id=disk.id)],
                         from_checkpoint_id=full.to_checkpoint_id)),
                     "does not exist")
        # Incremental backup needs a cow disk.
        expect_error(sdk.Error, 400, lambda: system.disks_service().add(
            types.Disk(name="r", format=types.DiskFormat.RAW,
                       backup=types.DiskBackup.INCREMENTAL,
                       provisioned_size=SIZE,
                       storage_domains=[types.StorageDomain(name="data")])),
            "cow")
        # A backup transfer of a backup that is not ready / does not exist.
        transfers = system.image_transfers_service()
        def backup_transfer(backup_id):
            return transfers.add(types.ImageTransfer(
                disk=types.Disk(id=disk.id),
                direction=types.ImageTransferDirection.DOWNLOAD,
                backup=types.Backup(id=backup_id),
                format=types.DiskFormat.RAW))
        expect_error(sdk.Error, 409, lambda: backup_transfer(incr.id),
                     "not ready")
        expect_error(sdk.Error, 400, lambda: backup_transfer(
            "0b5e7000-0000-4000-8000-000000000000"), "does not exist")
        ok("faults")
    elif mode == "start":
        disk = add_cow_disk(connection, "bk-restart")
        data = [(0, b"\x55" * 65536)]
        upload(connection, host, disk.id, data)
        vm = add_vm(connection, "vm-restart", disk.id)
        backup = start_backup(connection, vm.id)
        with open(ids_file, "w") as f:
            f.write("%s %s %s\n" % (vm.id, backup.id, disk.id))
        ok("backup ready")
    else:
        with open(ids_file) as f:
            vm_id, backup_id, disk_id = f.read().split()
        backup = vms.vm_service(vm_id).backups_service() \
            .backup_service(backup_id).get()
        assert backup.phase == B.READY, backup.phase
        ds = system.disks_service().disk_service(disk_id)
        assert ds.get().status == types.DiskStatus.LOCKED
        path = os.path.join(work, "restart.qcow2")
        download_backup(connection, host, backup, path)
        stop_backup(connection, backup)
        wait(lambda: ds.get().status == types.DiskStatus.OK, "disk unlocked")
        ref = bytearray(SIZE)
        apply(ref, [(0, b"\x55" * 65536)])
        same(path, bytes(ref), "ref-restart")
        ok("backup survives a restart")
print("DONE")
