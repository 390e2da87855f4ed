#!/usr/bin/python3
"""Capture what real NBD clients send, as seeds for the `handshake` fuzz target.

Starts `nbdbridge serve --file` on a small image, puts a recording proxy in
front of it, runs real clients (qemu-img, qemu-io, nbdinfo, nbdcopy) through
the proxy and writes each connection's client-to-server bytes to
fuzz/seeds/handshake/<client>-<n>. `cargo test` replays every seed through
the server (src/nbd/fuzzing.rs), and `cargo fuzz run handshake
fuzz/seeds/handshake` starts from them.

usage: fuzz/capture_seeds.py [path/to/nbdbridge]   (after cargo build)
"""
import os
import socket
import subprocess
import sys
import tempfile
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fuzz", "seeds", "handshake")
SIZE = 256 * 1024


def pump(src, dst, record, done):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            if record is not None:
                record.append(data)
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        done()


class Proxy:
    """Accepts on `path`, forwards to `target`, records client bytes."""

    def __init__(self, path, target):
        self.path, self.target = path, target
        self.sessions = []
        self.open = 0
        self.lock = threading.Condition()
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(16)
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX)
            server.connect(self.target)
            record = []
            with self.lock:
                self.sessions.append(record)
                self.open += 2
            threading.Thread(target=pump, args=(client, server, record, self.done), daemon=True).start()
            threading.Thread(target=pump, args=(server, client, None, self.done), daemon=True).start()

    def done(self):
        with self.lock:
            self.open -= 1
            self.lock.notify_all()

    def take(self):
        """The sessions so far, once every connection has closed."""
        with self.lock:
            if not self.lock.wait_for(lambda: self.open == 0, timeout=30):
                raise RuntimeError("proxied connections did not close")
            out, self.sessions = self.sessions, []
        return [b"".join(r) for r in out]


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "debug", "nbdbridge")
    os.makedirs(OUT, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        image = os.path.join(tmp, "disk.raw")
        with open(image, "wb") as f:
            f.truncate(SIZE)
        src = os.path.join(tmp, "src.raw")
        with open(src, "wb") as f:
            f.write(os.urandom(64 * 1024))
            f.truncate(SIZE)
        real = os.path.join(tmp, "real.sock")
        serve = subprocess.Popen(
            [binary, "serve", "--file", image, "--socket", real],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            serve.stdout.readline()
            proxy_path = os.path.join(tmp, "proxy.sock")
            proxy = Proxy(proxy_path, real)
            uri = f"nbd+unix:///?socket={proxy_path}"
            clients = {
                "qemu-img-info": ["qemu-img", "info", uri],
                "qemu-img-convert": ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri],
                "qemu-img-map": ["qemu-img", "map", "--output=json", "-f", "raw", uri],
                "qemu-io": ["qemu-io", "-f", "raw",
                            "-c", "write -P 0x5a 4096 8192", "-c", "write -z 65536 65536",
                            "-c", "discard 131072 4096", "-c", "read -P 0x5a 4096 8192",
                            "-c", "flush", uri],
                "nbdinfo": ["nbdinfo", uri],
                "nbdinfo-list": ["nbdinfo", "--list", uri],
                "nbdinfo-map": ["nbdinfo", "--map", uri],
                "nbdcopy-read": ["nbdcopy", "--connections=2", uri, "null:"],
                "nbdcopy-write": ["nbdcopy", "--connections=2", "--flush", src, uri],
            }
            for name, cmd in clients.items():
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=60)
                sessions = proxy.take()
                for i, data in enumerate(s for s in sessions if s):
                    with open(os.path.join(OUT, f"{name}-{i}"), "wb") as f:
                        f.write(data)
                print(f"{name}: {len(sessions)} connection(s)")
        finally:
            serve.terminate()
            serve.wait()


if __name__ == "__main__":
    main()
