#!/usr/bin/env bash
# Throughput of `nbdbridge serve --file` against qemu-nbd on the same file,
# measured side by side in one run with nbdcopy:
#   read:  NBD -> null:          (read-only export of a 2 GiB data file)
#   write: local file -> NBD     (writable export of a 2 GiB target file)
# Runs alternate ours / qemu-nbd, REPS times each; the median MB/s of each is
# printed with the ratio ours / qemu-nbd, and the peak RSS (VmHWM) of our
# server.
#
#   benches/nbd_throughput.sh                 # 2 GiB, 5 repetitions
#   SIZE_MIB=512 REPS=3 benches/nbd_throughput.sh
#   NBDCOPY_ARGS="--connections=1" benches/nbd_throughput.sh
#   FLUSH=1 benches/nbd_throughput.sh          # nbdcopy --flush on writes
#   NBDBRIDGE_BENCH_SERVER=qemu-nbd ...        # "ours" is qemu-nbd too (to
#                                              # check the script itself)
#
# Needs: cargo, qemu-nbd (qemu-utils), nbdcopy (libnbd-bin).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SIZE_MIB=${SIZE_MIB:-2048}
REPS=${REPS:-5}
NBDCOPY_ARGS=${NBDCOPY_ARGS:-}
FLUSH=${FLUSH:-0}

die() { echo "nbd_throughput: $*" >&2; exit 1; }
for tool in cargo qemu-nbd nbdcopy; do
    command -v "$tool" >/dev/null || die "$tool is missing (scripts/test installs it)"
done

STANDIN=${NBDBRIDGE_BENCH_SERVER:-}
if [ "$STANDIN" != qemu-nbd ]; then
    echo "building release binary..." >&2
    cargo build --release --quiet --bin nbdbridge || die "cargo build --release"
fi
BIN=${CARGO_TARGET_DIR:-target}/release/nbdbridge

WORK=$(mktemp -d "${TMPDIR:-/tmp}/nbd-bench.XXXXXX")
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

SRC=$WORK/src.img
echo "creating ${SIZE_MIB} MiB of random data in $SRC..." >&2
# 16 MiB of /dev/urandom repeated with a changing header per block: fast to
# make, never all zeros, and not compressible into holes.
head -c $((16 << 20)) /dev/urandom > "$WORK/block"
for ((i = 0; i < SIZE_MIB / 16; i++)); do
    printf '%016d' "$i"
    tail -c +17 "$WORK/block"
done > "$SRC"
[ "$(stat -c %s "$SRC")" -eq $((SIZE_MIB << 20)) ] || die "source file has the wrong size"
truncate -s "${SIZE_MIB}M" "$WORK/dst-ours.img" "$WORK/dst-qemu.img"

# start_ours FILE NAME [--read-only]: start nbdbridge, wait for its URI line.
start_ours() {
    local file=$1 name=$2
    shift 2
    if [ "$STANDIN" = qemu-nbd ]; then
        start_qemu "$file" "$name" "$@"
        return
    fi
    local out=$WORK/$name.out
    : > "$out"
    "$BIN" serve --file "$file" --socket "$WORK/$name.sock" --export-name "$name" "$@" \
        > "$out" 2> "$WORK/$name.log" &
    PIDS+=($!)
    LAST_PID=$!
    local deadline=$((SECONDS + 30))
    until [ -s "$out" ] && head -n1 "$out" | grep -q '^nbd'; do
        kill -0 "$LAST_PID" 2>/dev/null || die "nbdbridge serve exited: $(cat "$WORK/$name.log")"
        ((SECONDS < deadline)) || die "nbdbridge serve printed no URI in 30 s"
        sleep 0.05
    done
    LAST_URI=$(head -n1 "$out")
}

# start_qemu FILE NAME [--read-only]: start qemu-nbd, wait for its socket.
start_qemu() {
    local file=$1 name=$2
    shift 2
    qemu-nbd --persistent --shared=0 -f raw --cache=writeback --aio=threads \
        -k "$WORK/$name.sock" -x "$name" "$@" "$file" 2> "$WORK/$name.log" &
    PIDS+=($!)
    LAST_PID=$!
    local deadline=$((SECONDS + 30))
    until [ -S "$WORK/$name.sock" ]; do
        kill -0 "$LAST_PID" 2>/dev/null || die "qemu-nbd exited: $(cat "$WORK/$name.log")"
        ((SECONDS < deadline)) || die "qemu-nbd did not listen in 30 s"
        sleep 0.05
    done
    LAST_URI="nbd+unix:///$name?socket=$WORK/$name.sock"
}

# mbps SRC DST [extra nbdcopy args]: run nbdcopy, print MB/s (10^6 bytes).
mbps() {
    local src=$1 dst=$2
    shift 2
    local t0 t1
    t0=$(date +%s.%N)
    # shellcheck disable=SC2086
    nbdcopy $NBDCOPY_ARGS "$@" "$src" "$dst" || die "nbdcopy $src $dst failed"
    t1=$(date +%s.%N)
    awk -v b=$((SIZE_MIB << 20)) -v t0="$t0" -v t1="$t1" 'BEGIN { printf "%.1f\n", b / 1e6 / (t1 - t0) }'
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

start_ours "$SRC" ours-ro --read-only;  OURS_RO=$LAST_URI; OURS_RO_PID=$LAST_PID
start_ours "$WORK/dst-ours.img" ours-rw; OURS_RW=$LAST_URI; OURS_RW_PID=$LAST_PID
start_qemu "$SRC" qemu-ro --read-only;  QEMU_RO=$LAST_URI
start_qemu "$WORK/dst-qemu.img" qemu-rw; QEMU_RW=$LAST_URI

# Warm up: the page cache for the source and one uncounted read per server.
cat "$SRC" > /dev/null
mbps "$OURS_RO" null: > /dev/null
mbps "$QEMU_RO" null: > /dev/null

write_args=()
if [ "$FLUSH" = 1 ]; then write_args=(--flush); fi

: > "$WORK/r-ours"; : > "$WORK/r-qemu"; : > "$WORK/w-ours"; : > "$WORK/w-qemu"
for ((rep = 1; rep <= REPS; rep++)); do
    # Alternate which server goes first in each repetition.
    if ((rep % 2)); then order=(ours qemu); else order=(qemu ours); fi
    for who in "${order[@]}"; do
        if [ "$who" = ours ]; then ro=$OURS_RO; rw=$OURS_RW; else ro=$QEMU_RO; rw=$QEMU_RW; fi
        r=$(mbps "$ro" null:)
        w=$(mbps "$SRC" "$rw" "${write_args[@]}")
        echo "$r" >> "$WORK/r-$who"
        echo "$w" >> "$WORK/w-$who"
        printf 'rep %d %-8s read %8.1f MB/s   write %8.1f MB/s\n' "$rep" "$who" "$r" "$w" >&2
    done
done

# Check the written copies are right (a fast server that loses data is no win).
cmp -s "$SRC" "$WORK/dst-ours.img" || die "nbdbridge target differs from the source"
cmp -s "$SRC" "$WORK/dst-qemu.img" || die "qemu-nbd target differs from the source"

r_ours=$(median < "$WORK/r-ours"); r_qemu=$(median < "$WORK/r-qemu")
w_ours=$(median < "$WORK/w-ours"); w_qemu=$(median < "$WORK/w-qemu")
hwm() { awk '/^VmHWM/ { printf "%.1f MiB", $2 / 1024 }' "/proc/$1/status" 2>/dev/null || echo "?"; }
rss_ro=$(hwm "$OURS_RO_PID"); rss_rw=$(hwm "$OURS_RW_PID")

echo
echo "nbdcopy throughput, ${SIZE_MIB} MiB, median of $REPS (nbdcopy ${NBDCOPY_ARGS:-defaults}), $(nproc) cores"
printf '%-6s %14s %14s %8s\n' "" "nbdbridge" "qemu-nbd" "ratio"
awk -v a="$r_ours" -v b="$r_qemu" 'BEGIN { printf "%-6s %9.1f MB/s %9.1f MB/s %8.2f\n", "read", a, b, a / b }'
awk -v a="$w_ours" -v b="$w_qemu" 'BEGIN { printf "%-6s %9.1f MB/s %9.1f MB/s %8.2f\n", "write", a, b, a / b }'
echo "nbdbridge peak RSS (VmHWM): read-only server $rss_ro, writable server $rss_rw"
