"""API details that do not depend on the host: disk search (the SDK's
`disks_service().list(search=...)`), and the faults for transfers the
engine refuses (disk snapshots, unknown backups).

usage: engine_api.py API_URL PASSWORD_FILE
"""

import sys

import ovirtsdk4 as sdk
import ovirtsdk4.types as types

from engine_common import add_disk, connect, expect_error, ok

url, password_file = sys.argv[1:3]
MiB = 1024 * 1024

with connect(url, password_file) as connection:
    system = connection.system_service()
    disks_service = system.disks_service()
    a1 = add_disk(connection, "alpha-1", MiB)
    a2 = add_disk(connection, "alpha-2", MiB, fmt=types.DiskFormat.COW)
    b = add_disk(connection, "beta", MiB)

    def names(search, **kw):
        return sorted(d.name for d in disks_service.list(search=search, **kw))

    assert names("name=alpha-1") == ["alpha-1"], names("name=alpha-1")
    assert names("name=alpha*") == ["alpha-1", "alpha-2"]
    assert names("name=*a*") == ["alpha-1", "alpha-2", "beta"]
    assert names('name="beta"') == ["beta"]
    assert names("name = beta") == ["beta"]
    assert names("name=gamma") == []
    assert names("alias=alpha-2") == ["alpha-2"]
    assert names("id=%s" % b.id) == ["beta"]
    assert names("name!=beta") == ["alpha-1", "alpha-2"]
    assert names("name=alpha* and status=ok") == ["alpha-1", "alpha-2"]
    assert names("name=alpha* AND id=%s" % a2.id) == ["alpha-2"]
    assert names("status=locked") == []
    assert names("") == ["alpha-1", "alpha-2", "beta"]
    ok("search name alias id status")

    # Case: sensitive by default, as the API says; case_sensitive=False.
    assert names("name=ALPHA-1") == []
    assert names("name=ALPHA-1", case_sensitive=False) == ["alpha-1"]
    assert names("Name=alpha-1") == ["alpha-1"]  # field names never are
    assert len(disks_service.list(max=2)) == 2
    assert len(disks_service.list(search="name=alpha*", max=1)) == 1
    ok("search case_sensitive max")

    # Syntax we do not support is refused, not ignored.
    for search, text in (
        ("name=alpha-1 or name=beta", "'or' is not supported"),
        ("provisioned_size>1", "unsupported operator"),
        ("size=1048576", "unknown field 'size'"),
        ("alpha", "expected FIELD=VALUE"),
        ("name=alpha* sortby name", "'sortby' is not supported"),
        ("Disks: name=beta", "expected FIELD=VALUE"),
        ("status=broken", "'broken' is not a disk status"),
        ("name=", "empty value"),
        ('name="beta', "unterminated quote"),
    ):
        e = expect_error(sdk.Error, 400,
                         lambda: disks_service.list(search=search), text)
        assert e.fault.reason == "Operation Failed", e.fault.reason
    ok("unsupported search 400")

    transfers = system.image_transfers_service()
    snap = "5a9c0000-0000-4000-8000-00000000beef"
    expect_error(sdk.Error, 400, lambda: transfers.add(types.ImageTransfer(
        snapshot=types.DiskSnapshot(id=snap))),
        "Cannot transfer Virtual Disk: transfers of disk snapshots are not "
        "supported (snapshot %s)" % snap)
    expect_error(sdk.Error, 400, lambda: transfers.add(types.ImageTransfer(
        disk=types.Disk(id=a1.id), snapshot=types.DiskSnapshot(id=snap))),
        "snapshot %s" % snap)
    backup = "bac00000-0000-4000-8000-0000000000b1"
    expect_error(sdk.Error, 400, lambda: transfers.add(types.ImageTransfer(
        disk=types.Disk(id=a1.id), backup=types.Backup(id=backup),
        direction=types.ImageTransferDirection.DOWNLOAD,
        format=types.DiskFormat.RAW)),
        "Cannot transfer Virtual Disk: backup %s does not exist." % backup)
    # Nothing was locked by the refused adds.
    assert disks_service.disk_service(a1.id).get().status == \
        types.DiskStatus.OK
    assert transfers.list() == []
    ok("snapshot and backup transfers 400")
print("DONE")
