# Shared by the benches (sourced, not run).

# imageio_daemon_conf DIR: the configuration of a real ovirt-imageio daemon
# (`ovirt-imageio -c DIR`) for a bench: unprivileged, no TLS, its data port
# picked freely on 127.0.0.1 (read it from DIR/daemon.log), its local and
# control sockets and its log in DIR.
imageio_daemon_conf() {
    mkdir -p "$1/conf.d"
    cat > "$1/conf.d/99-bench.conf" <<CONF
[daemon]
drop_privileges = false
systemd_enable = false
run_dir = $1
[tls]
enable = false
[remote]
host = 127.0.0.1
port = 0
[local]
enable = true
socket = $1/local.sock
[control]
transport = unix
socket = $1/ctl.sock
[handler_logfile]
args = ('$1/daemon.log',)
CONF
}
