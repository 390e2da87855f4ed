#!/usr/bin/env bash
# Throughput of our imageio data server (`nbdbridge imageio`, release build)
# against the real ovirt-imageio daemon, same machine, same workloads:
#   curl GET of the whole image (cold: the image's pages dropped from the
#   page cache first; and warm), curl PUT of the whole image (flush=y),
#   imageio client download (raw, cold) and upload.
# Last, the disk's own ceiling (dd with O_DIRECT) for the cold read and the
# flushed write, which bound both servers.
# Prints MB/s per workload and server, and the ratio ours/daemon.
#
# usage: [REPS=2] benches/imageio.sh [SIZE_MIB]   (default 2048; best of REPS runs)
# needs: cargo, curl, the test venv (.venv with ovirt-imageio), qemu-img.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=benches/lib.sh
source "$repo/benches/lib.sh"
size_mib=${1:-2048}
size=$((size_mib * 1024 * 1024))
py=$repo/.venv/bin/python
client=$repo/tests/imageio/client.py

[ -x "$py" ] && [ -x "$repo/.venv/bin/ovirt-imageio" ] || {
    echo "imageio.sh: the test venv is missing (scripts/test creates it)" >&2
    exit 1
}
cargo build --release --quiet --manifest-path "$repo/Cargo.toml"
bin=${CARGO_TARGET_DIR:-$repo/target}/release/nbdbridge

work=$(mktemp -d /tmp/imageio-bench.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

echo "image: ${size_mib} MiB of random data in $work" >&2
# Random-looking data, fast: AES-CTR keystream over zeroes.
head -c "$size" /dev/zero |
    openssl enc -aes-128-ctr -nosalt -pass pass:bench -pbkdf2 2>/dev/null >"$work/src.raw"

# --- servers ---------------------------------------------------------------
mkdir -p "$work/ours" "$work/daemon/conf.d"
"$bin" imageio --listen 127.0.0.1:0 --control-socket "$work/ours/ctl.sock" \
    --local-socket "$work/ours/local.sock" >"$work/ours/out" 2>"$work/ours/log" &
pids+=($!)

imageio_daemon_conf "$work/daemon"
"$repo/.venv/bin/ovirt-imageio" -c "$work/daemon" &
pids+=($!)

wait_for() { # what, command...
    local what=$1; shift
    for _ in $(seq 300); do "$@" && return 0; sleep 0.1; done
    echo "imageio.sh: timed out waiting for $what" >&2
    exit 1
}
wait_for "our server" test -s "$work/ours/out"
ours_base=$(head -1 "$work/ours/out")
wait_for "the daemon" grep -qs "Ready for requests" "$work/daemon/daemon.log"
port=$(grep -o "remote.service listening on ('127.0.0.1', [0-9]*" "$work/daemon/daemon.log" | grep -o '[0-9]*$')
daemon_base=http://127.0.0.1:$port/images/

ticket() { # server id path ops-json
    local sock=$work/$1/ctl.sock
    curl -sf --unix-socket "$sock" -X PUT "http://localhost/tickets/$2" --data-binary \
        "{\"uuid\":\"$2\",\"size\":$size,\"url\":\"file://$3\",\"timeout\":3600,\"ops\":$4,\"sparse\":true}"
}

now() { date +%s.%N; }
# Drop one file's pages from the page cache (cold reads, nothing global).
uncache() { dd if=/dev/null of="$1" oflag=nocache conv=notrunc,fdatasync count=0 status=none; }
mbps() { # bytes seconds
    awk -v b="$1" -v s="$2" 'BEGIN { printf "%.0f", b / s / 1e6 }'
}

# One run of workload $1 on server $2 (base URL $3); prints MB/s.
run() {
    local workload=$1 server=$2 base=$3 dst t0 t1
    dst=$work/$server/dst.raw
    rm -f "$dst" "$work/$server/down.raw"
    truncate -s "$size" "$dst"
    case $workload in
    curl-get)
        ticket "$server" get-ticket "$work/src.raw" '["read"]'
        uncache "$work/src.raw"
        t0=$(now)
        curl -sf -o /dev/null "${base}get-ticket"
        t1=$(now) ;;
    curl-get-warm)
        ticket "$server" get-ticket "$work/src.raw" '["read"]'
        cat "$work/src.raw" >/dev/null
        t0=$(now)
        curl -sf -o /dev/null "${base}get-ticket"
        t1=$(now) ;;
    curl-put)
        ticket "$server" put-ticket "$dst" '["write"]'
        t0=$(now)
        # -T streams the file (--data-binary would slurp it into memory first).
        curl -sf -X PUT -H 'Expect:' -T "$work/src.raw" "${base}put-ticket?flush=y" >/dev/null
        t1=$(now) ;;
    client-download)
        ticket "$server" dl-ticket "$work/src.raw" '["read"]'
        uncache "$work/src.raw"
        t0=$(now)
        "$py" "$client" download "${base}dl-ticket" "$work/$server/down.raw" raw
        t1=$(now) ;;
    client-upload)
        ticket "$server" up-ticket "$dst" '["write"]'
        t0=$(now)
        "$py" "$client" upload "$work/src.raw" "${base}up-ticket"
        t1=$(now) ;;
    esac
    case $workload in
    curl-put | client-upload) cmp -s "$work/src.raw" "$dst" || { echo "$server $workload: data differs" >&2; exit 1; } ;;
    client-download) cmp -s "$work/src.raw" "$work/$server/down.raw" || { echo "$server $workload: data differs" >&2; exit 1; } ;;
    esac
    mbps "$size" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')"
}

best() { # workload server base: best of $reps runs (the machine is shared)
    local b=0 r
    for _ in $(seq "$reps"); do
        r=$(run "$@")
        [ "$r" -gt "$b" ] && b=$r
    done
    echo "$b"
}
reps=${REPS:-2}

echo "best of $reps runs per workload and server" >&2
printf '%-16s %12s %12s %8s\n' workload "ours MB/s" "daemon MB/s" ratio
for w in curl-get curl-get-warm curl-put client-download client-upload; do
    o=$(best "$w" ours "$ours_base")
    d=$(best "$w" daemon "$daemon_base")
    printf '%-16s %12s %12s %7.2fx\n' "$w" "$o" "$d" "$(awk -v o="$o" -v d="$d" 'BEGIN { print o / d }')"
done
echo "peak RSS of our server: $(awk '/VmHWM/ { print $2, $3 }' /proc/"${pids[0]}"/status)"
# The hardware's ceiling for the disk-bound workloads, same file system, same
# size: what no server can beat on a cold read or a flushed write.
uncache "$work/src.raw"
t0=$(now); dd if="$work/src.raw" of=/dev/null bs=8M iflag=direct status=none; t1=$(now)
dr=$(mbps "$size" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')")
t0=$(now); dd if="$work/src.raw" of="$work/ceiling.raw" bs=8M oflag=direct conv=fsync status=none; t1=$(now)
dw=$(mbps "$size" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')")
rm -f "$work/ceiling.raw"
echo "disk ceiling (dd, 8 MiB O_DIRECT): read ${dr} MB/s, write ${dw} MB/s"
