#!/usr/bin/env bash
# Throughput of the whole bridge (issue 5), measured side by side in one run:
#   - nbdcopy write and read through the embedded pipeline
#     (`nbdbridge serve --disk`: NBD -> the embedded data server, in-process -> file),
#   - nbdcopy write and read of the same image through qemu-nbd (no HTTP at all),
#   - nbdcopy read through nbdkit's curl plugin and through
#     `nbdbridge serve --imageio-url`, both reading the same ticket of one
#     `nbdbridge imageio` data server.
# Reads are measured warm (the image in the page cache, as qemu-nbd finds a
# file it has just written) and, when this runs as root, cold (caches
# dropped first, the disk read by both). Our data server writes with
# O_DIRECT, so without the warm pass the bridge would read cold against a
# warm qemu-nbd.
# Prints MB/s, the ratios bridge/qemu-nbd and bridge/nbdkit-curl, and the
# bridge's peak RSS.
#
# usage: [SIZE_MIB=2048] [REPS=3] benches/bridge_throughput.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SIZE_MIB=${SIZE_MIB:-2048}
REPS=${REPS:-3}
die() { echo "bridge_throughput: $*" >&2; exit 1; }
for tool in cargo qemu-nbd nbdcopy nbdkit curl; do
    command -v "$tool" >/dev/null || die "$tool is missing (scripts/test installs it)"
done
nbdkit curl --dump-plugin >/dev/null 2>&1 || die "nbdkit's curl plugin is missing"

echo "building release binary..." >&2
cargo build --release --quiet --bin nbdbridge || die "cargo build --release"
BIN=${CARGO_TARGET_DIR:-target}/release/nbdbridge

WORK=$(mktemp -d "${TMPDIR:-/tmp}/bridge-bench.XXXXXX")
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

SRC=$WORK/src.img
echo "creating ${SIZE_MIB} MiB of random data..." >&2
head -c $((16 << 20)) /dev/urandom > "$WORK/block"
for ((i = 0; i < SIZE_MIB / 16; i++)); do printf '%016d' "$i"; tail -c +17 "$WORK/block"; done > "$SRC"
BYTES=$((SIZE_MIB << 20))

now() { date +%s.%N; }
mbps() { echo "scale=1; $BYTES / 1048576 / ($2 - $1)" | bc; }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }

# Start a command that prints its contract line first; sets LINE and PID.
start() {
    local out=$WORK/out.$RANDOM
    "$@" > "$out" 2>> "$WORK/log" &
    PID=$!
    PIDS+=("$PID")
    for _ in $(seq 1 300); do
        LINE=$(head -1 "$out" 2>/dev/null || true)
        [ -n "$LINE" ] && return 0
        sleep 0.1
    done
    die "no contract line from: $*"
}
can_drop() { [ -w /proc/sys/vm/drop_caches ]; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
warm() { find "$@" -type f -size +1M -exec cat {} + > /dev/null; }
peak_rss() { awk '/VmHWM/{print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

BRIDGE_W=() BRIDGE_R=() BRIDGE_RC=() QEMU_W=() QEMU_R=() QEMU_RC=() CURL_R=() URL_R=() RSS=0
DATA=$WORK/data
for ((rep = 1; rep <= REPS; rep++)); do
    disk=bench$rep
    # Embedded pipeline: upload, then download.
    start "$BIN" serve --disk "$disk" --size "${SIZE_MIB}M" --data-dir "$DATA" --socket "$WORK/up.sock"
    t0=$(now); nbdcopy --flush "$SRC" "$LINE"; t1=$(now)
    r=$(peak_rss "$PID"); RSS=$((r > RSS ? r : RSS))
    wait "$PID" || die "upload serve failed (see $WORK/log)"
    BRIDGE_W+=("$(mbps "$t0" "$t1")")
    if can_drop; then
        drop_caches
        start "$BIN" serve --disk "$disk" --direction download --data-dir "$DATA" --socket "$WORK/down.sock"
        t0=$(now); nbdcopy "$LINE" null:; t1=$(now)
        wait "$PID" || die "download serve failed (see $WORK/log)"
        BRIDGE_RC+=("$(mbps "$t0" "$t1")")
    fi
    warm "$DATA/images"
    start "$BIN" serve --disk "$disk" --direction download --data-dir "$DATA" --socket "$WORK/down.sock"
    t0=$(now); nbdcopy "$LINE" null:; t1=$(now)
    r=$(peak_rss "$PID"); RSS=$((r > RSS ? r : RSS))
    wait "$PID" || die "download serve failed (see $WORK/log)"
    BRIDGE_R+=("$(mbps "$t0" "$t1")")

    # qemu-nbd on a plain file.
    IMG=$WORK/qemu.img; truncate -s "$BYTES" "$IMG"; rm -f "$WORK/q.sock"
    qemu-nbd -f raw --shared=0 --persistent -k "$WORK/q.sock" "$IMG" & PIDS+=($!); QPID=$!
    for _ in $(seq 1 100); do [ -S "$WORK/q.sock" ] && break; sleep 0.05; done
    t0=$(now); nbdcopy --flush "$SRC" "nbd+unix:///?socket=$WORK/q.sock"; t1=$(now)
    QEMU_W+=("$(mbps "$t0" "$t1")")
    t0=$(now); nbdcopy "nbd+unix:///?socket=$WORK/q.sock" null:; t1=$(now)
    QEMU_R+=("$(mbps "$t0" "$t1")")
    if can_drop; then
        drop_caches
        t0=$(now); nbdcopy "nbd+unix:///?socket=$WORK/q.sock" null:; t1=$(now)
        QEMU_RC+=("$(mbps "$t0" "$t1")")
    fi
    kill -TERM "$QPID"; wait "$QPID" 2>/dev/null || true; rm -f "$WORK/q.sock" "$IMG"

    # One data server; nbdkit-curl and the bridge read the same ticket.
    rm -f "$WORK/ctl.sock" "$WORK/local.sock"
    warm "$SRC"
    start "$BIN" imageio --listen 127.0.0.1:0 --control-socket "$WORK/ctl.sock" --local-socket "$WORK/local.sock"
    IPID=$PID; BASE=$LINE
    curl -sf --unix-socket "$WORK/ctl.sock" -X PUT "http://localhost/tickets/bench$rep" \
        -d "{\"uuid\":\"bench$rep\",\"size\":$BYTES,\"url\":\"file://$SRC\",\"timeout\":3600,\"ops\":[\"read\"]}" \
        || die "cannot add the ticket"
    rm -f "$WORK/k.sock"
    nbdkit -U "$WORK/k.sock" --exit-with-parent curl "url=${BASE}bench$rep" & PIDS+=($!); KPID=$!
    for _ in $(seq 1 100); do [ -S "$WORK/k.sock" ] && break; sleep 0.05; done
    t0=$(now); nbdcopy "nbd+unix:///?socket=$WORK/k.sock" null:; t1=$(now)
    CURL_R+=("$(mbps "$t0" "$t1")")
    kill -TERM "$KPID"; wait "$KPID" 2>/dev/null || true
    start "$BIN" serve --imageio-url "${BASE}bench$rep" --read-only --socket "$WORK/u.sock"
    t0=$(now); nbdcopy "$LINE" null:; t1=$(now)
    URL_R+=("$(mbps "$t0" "$t1")")
    kill -TERM "$PID"; wait "$PID" 2>/dev/null || true
    kill -TERM "$IPID"; wait "$IPID" 2>/dev/null || true
    echo "rep $rep: bridge w ${BRIDGE_W[-1]} r ${BRIDGE_R[-1]}, qemu-nbd w ${QEMU_W[-1]} r ${QEMU_R[-1]}, nbdkit-curl r ${CURL_R[-1]}, --imageio-url r ${URL_R[-1]} MB/s" >&2
done

bw=$(median "${BRIDGE_W[@]}"); br=$(median "${BRIDGE_R[@]}")
brc=$(median "${BRIDGE_RC[@]:-0}"); qrc=$(median "${QEMU_RC[@]:-0}")
qw=$(median "${QEMU_W[@]}"); qr=$(median "${QEMU_R[@]}")
cr=$(median "${CURL_R[@]}"); ur=$(median "${URL_R[@]}")
echo
echo "nbdcopy through the bridge, ${SIZE_MIB} MiB, median of $REPS, $(nproc) cores"
printf '%-38s %10s MB/s\n' "bridge write (embedded pipeline)" "$bw" \
    "bridge read warm (embedded pipeline)" "$br" "bridge read cold (embedded pipeline)" "$brc" \
    "qemu-nbd write" "$qw" "qemu-nbd read warm" "$qr" "qemu-nbd read cold" "$qrc" \
    "nbdkit-curl read (same data server)" "$cr" "serve --imageio-url read (same)" "$ur"
echo "ratio bridge/qemu-nbd: write $(echo "scale=2; $bw / $qw" | bc), read warm $(echo "scale=2; $br / $qr" | bc)"
if can_drop; then
    echo "ratio bridge/qemu-nbd read cold: $(echo "scale=2; $brc / $qrc" | bc)"
fi
echo "ratio bridge/nbdkit-curl read: embedded $(echo "scale=2; $br / $cr" | bc), --imageio-url $(echo "scale=2; $ur / $cr" | bc)"
echo "bridge peak RSS (VmHWM): $((RSS / 1024)) MiB"
