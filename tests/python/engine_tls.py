"""https: the SDK with ca_file and with insecure=True works; without
either it fails on the self-signed certificate.

usage: engine_tls.py API_URL PASSWORD_FILE CA_FILE
"""

import sys

import ovirtsdk4 as sdk
import ovirtsdk4.types as types

from engine_common import ok

url, password_file, ca_file = sys.argv[1:4]
assert url.startswith("https://"), url
with open(password_file) as f:
    password = f.read().strip()

with sdk.Connection(url=url, username="admin@internal", password=password,
                    ca_file=ca_file) as connection:
    disks = connection.system_service().disks_service()
    disk = disks.add(types.Disk(name="tls", format=types.DiskFormat.RAW,
                                provisioned_size=1 << 20,
                                storage_domains=[types.StorageDomain(name="data")]))
    assert disks.disk_service(disk.id).get().provisioned_size == 1 << 20
    ok("ca_file")

with sdk.Connection(url=url, username="admin@internal", password=password,
                    insecure=True) as connection:
    names = [d.name for d in connection.system_service().disks_service().list()]
    assert "tls" in names, names
    ok("insecure")

connection = sdk.Connection(url=url, username="admin@internal",
                            password=password)
try:
    connection.system_service().disks_service().list()
    raise AssertionError("an unverified certificate was accepted")
except sdk.Error as e:
    assert "certificate" in str(e).lower(), str(e)
ok("unverified refused")
print("DONE")
