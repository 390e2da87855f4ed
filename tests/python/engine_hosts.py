"""Host status and the choice of host: a transfer that names no host goes
to a host that is up.

usage: engine_hosts.py API_URL PASSWORD_FILE DOWN_HOST UP_HOST WORK_DIR
"""

import os
import sys

import ovirtsdk4.types as types
from ovirt_imageio import client

from engine_common import add_disk, connect, get_bytes, ok, wait_phase

url, password_file, down_name, up_name, work = sys.argv[1:6]
SIZE = 1024 * 1024
P = types.ImageTransferPhase

with connect(url, password_file) as connection:
    system = connection.system_service()
    hosts = {h.name: h for h in system.hosts_service().list()}
    assert hosts[down_name].status == types.HostStatus.NON_RESPONSIVE, \
        hosts[down_name].status
    assert hosts[up_name].status == types.HostStatus.UP, hosts[up_name].status
    # The dead host comes first (it was registered first).
    assert [h.name for h in system.hosts_service().list()][0] == down_name
    ok("host status")

    # The SDK's plain upload flow: no host named.
    src = os.path.join(work, "src.raw")
    data = os.urandom(SIZE)
    with open(src, "wb") as f:
        f.write(data)
    disk = add_disk(connection, "no-host", SIZE)
    transfers = system.image_transfers_service()
    t = transfers.add(types.ImageTransfer(disk=types.Disk(id=disk.id)))
    ts = transfers.image_transfer_service(t.id)
    t = wait_phase(ts, P.TRANSFERRING)
    assert t.host.id == hosts[up_name].id, t.host.id
    client.upload(src, t.transfer_url, None, secure=False)
    ts.finalize()
    wait_phase(ts, P.FINISHED_SUCCESS)
    d = transfers.add(types.ImageTransfer(
        disk=types.Disk(id=disk.id),
        direction=types.ImageTransferDirection.DOWNLOAD))
    ds = transfers.image_transfer_service(d.id)
    d = wait_phase(ds, P.TRANSFERRING)
    assert get_bytes(d.transfer_url) == data
    ds.finalize()
    wait_phase(ds, P.FINISHED_SUCCESS)
    ok("upload went to the host that is up")
print("DONE")
