#!/usr/bin/env bash
# The bridge against its peers on the production path (issue 12), side by
# side in one run, alternating contenders round by round, medians of REPS:
#   write-defaults  nbdcopy (defaults) into the real ovirt-imageio daemon:
#                   `serve --imageio-url` vs virt-v2v's ovirt-upload nbdkit
#                   python plugin; the ticket is an nbd ticket over
#                   `qemu-nbd -f raw -e 8 -t` on a raw file
#   write-v2v       the same with virt-v2v's flags
#                   (--request-size=4194304 --requests=16 --flush)
#                   Both write rows also show their ceiling: nbdcopy with the
#                   same flags straight into the same qemu-nbd (no HTTP)
#   download        `serve --imageio-url --read-only` + nbdcopy vs
#                   ovirt_imageio.client.download(fmt="raw"), same ticket
#   url-read        `serve --imageio-url --read-only` + nbdcopy vs
#                   nbdkit-curl + nbdcopy, one file ticket of our data
#                   server (`nbdbridge imageio`): the real daemon answers no
#                   HEAD, which nbdkit-curl needs for the size
#   embedded-write  `serve --disk` (NBD -> the embedded data server's handlers,
#                   in-process: no socket between -> file)
#   embedded-read   vs qemu-nbd on a plain file (page cache warm)
#   curl            curl's own figure through the same daemon's unix socket,
#                   requests at once, each an equal slice: 8 PUTs then a
#                   PATCH flush (write-v2v), 4 GETs into the file and into
#                   /dev/null (download). A target above it is stopped by the daemon.
# Per row: MB/s of both, the ratio and the target, the verdict (met;
# ceiling = the target lies above curl's own figure; MISSED), the CPU seconds per GiB
# and peak RSS (VmHWM) of the bridge process and of the peer's process, and
# the daemon's CPU% (near 100% = the Python daemon is the ceiling). Then the
# machine's limits measured in the same run: TCP loopback, page cache read,
# the disk's O_DIRECT read and write.
#
# usage: [SIZE_MIB=1024] [REPS=3] [ONLY=write,download,url,embedded] \
#        OVIRT_UPLOAD_PLUGIN=/path/ovirt-upload-plugin.py benches/ovirt_throughput.sh
# ONLY picks groups of rows (default: all).
# OVIRT_UPLOAD_PLUGIN is virt-v2v's output/ovirt-upload-plugin.py (from the
# virt-v2v sources; never committed here). Without it the plugin rows are
# skipped. Needs: cargo, qemu-nbd, nbdcopy, nbdkit with its python plugin
# (Debian nbdkit-plugin-python) and curl plugin, the test venv (.venv).
# Figures mean something only on a quiet machine (check `uptime`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
# shellcheck source=benches/lib.sh
source benches/lib.sh

SIZE_MIB=${SIZE_MIB:-1024}
ONLY=${ONLY:-write,download,url,embedded}
want() { [[ ",$ONLY," == *",$1,"* ]]; }
REPS=${REPS:-3}
PLUGIN=${OVIRT_UPLOAD_PLUGIN:-}
die() { echo "ovirt_throughput: $*" >&2; exit 1; }
for tool in cargo qemu-nbd nbdcopy nbdkit curl bc; do
    command -v "$tool" >/dev/null || die "$tool is missing (scripts/test installs it)"
done
PY=$REPO/.venv/bin/python
[ -x "$PY" ] && [ -x "$REPO/.venv/bin/ovirt-imageio" ] || die "the test venv is missing (scripts/test)"
nbdkit curl --dump-plugin >/dev/null 2>&1 || die "nbdkit's curl plugin is missing"
if [ -n "$PLUGIN" ]; then
    [ -r "$PLUGIN" ] || die "OVIRT_UPLOAD_PLUGIN=$PLUGIN is not readable"
    nbdkit python --dump-plugin >/dev/null 2>&1 ||
        die "nbdkit's python plugin is missing: apt-get install nbdkit-plugin-python"
else
    echo "OVIRT_UPLOAD_PLUGIN is not set: the plugin rows are skipped" >&2
fi

echo "building release binary..." >&2
cargo build --release --quiet --bin nbdbridge || die "cargo build --release"
BIN=${CARGO_TARGET_DIR:-target}/release/nbdbridge

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ovirt-bench.XXXXXX")
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

BYTES=$((SIZE_MIB << 20))
SRC=$WORK/src.raw
echo "creating ${SIZE_MIB} MiB of random data in $WORK..." >&2
head -c "$BYTES" /dev/zero |
    openssl enc -aes-128-ctr -nosalt -pass pass:bench -pbkdf2 2>/dev/null > "$SRC"

HZ=$(getconf CLK_TCK)
now() { date +%s.%N; }
mbps() { echo "scale=1; $BYTES / 1000000 / ($2 - $1)" | bc; }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
# CPU ticks (user + system) of a process so far.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
peak_rss() { awk '/VmHWM/{print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
wait_sock() { for _ in $(seq 1 300); do [ -S "$1" ] && return 0; sleep 0.05; done; die "no socket $1"; }

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
    die "no contract line from: $* (see $WORK/log)"
}
stop() { kill -TERM "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# --- the real daemon, an nbd ticket over qemu-nbd ---------------------------
imageio_daemon_conf "$WORK/daemon"
"$REPO/.venv/bin/ovirt-imageio" -c "$WORK/daemon" & DPID=$!; PIDS+=("$DPID")
for _ in $(seq 1 300); do grep -qs "Ready for requests" "$WORK/daemon/daemon.log" && break; sleep 0.1; done
PORT=$(grep -o "remote.service listening on ('127.0.0.1', [0-9]*" "$WORK/daemon/daemon.log" | grep -o '[0-9]*$') ||
    die "the daemon did not start (see $WORK/daemon/daemon.log)"

# qemu-nbd over IMG (raw), as the production vdsm path; a ticket T on it.
QPID=
serve_image() { # image ticket-id
    [ -n "$QPID" ] && stop "$QPID"
    rm -f "$WORK/q.sock"
    qemu-nbd -f raw -e 8 -t -k "$WORK/q.sock" "$1" & QPID=$!; PIDS+=("$QPID")
    wait_sock "$WORK/q.sock"
    curl -sf --unix-socket "$WORK/daemon/ctl.sock" -X PUT "http://localhost/tickets/$2" \
        -d "{\"uuid\":\"$2\",\"size\":$BYTES,\"url\":\"nbd:unix:$WORK/q.sock\",\"timeout\":3600,\"ops\":[\"read\",\"write\"]}" \
        || die "cannot add ticket $2"
    URL=http://127.0.0.1:$PORT/images/$2
}

declare -A MB CPU RSS DCPU
record() { # key t0 t1 pid ticks0 daemon-ticks0
    local key=$1 t0=$2 t1=$3 pid=$4 k0=$5 d0=$6 el
    el=$(echo "$t1 - $t0" | bc)
    MB[$key]+=" $(mbps "$t0" "$t1")"
    if [ "$pid" != - ]; then
        # A server that exits at the end of its transfer (serve --disk) has
        # no ticks left to read: no figure rather than a wrong one.
        local k1; k1=$(ticks "$pid")
        if [ "$k1" -gt 0 ]; then
            CPU[$key]+=" $(echo "scale=2; ($k1 - $k0) / $HZ / ($BYTES / 1073741824)" | bc)"
        fi
        local r; r=$(peak_rss "$pid"); RSS[$key]=$(( r > ${RSS[$key]:-0} ? r : ${RSS[$key]:-0} ))
    fi
    DCPU[$key]+=" $(echo "scale=0; 100 * ($(ticks "$DPID") - $d0) / $HZ / $el" | bc)"
}

# Copy with nbdcopy ARGS... through the process PID serving LINE; record as KEY.
timed_nbdcopy() { # key pid from to nbdcopy-flags...
    local key=$1 pid=$2 from=$3 to=$4; shift 4
    local k0 d0 t0 t1
    k0=$(ticks "$pid"); d0=$(ticks "$DPID")
    t0=$(now); nbdcopy "$@" "$from" "$to"; t1=$(now)
    record "$key" "$t0" "$t1" "$pid" "$k0" "$d0"
    echo "  $key: $(mbps "$t0" "$t1") MB/s" >&2
}

# curl's own figure through the daemon's unix socket (the path the bridge
# and the plugin take), several requests at once, each an equal slice of the
# image: 8 PUTs (the daemon's max_writers, as many as the bridge opens) fed
# by dd, then one PATCH flush (as virt-v2v's flags end); 4 GETs (more read
# no faster here), each written by dd into its slice of the file, or dropped.
PUT_STREAMS=8
GET_STREAMS=4
curl_put() { # ticket-id
    local k pids=() slice=$((BYTES / PUT_STREAMS))
    for ((k = 0; k < PUT_STREAMS; k++)); do
        dd if="$SRC" bs=1M skip=$((k * slice >> 20)) count=$((slice >> 20)) status=none |
            curl -sf --unix-socket "$WORK/daemon/local.sock" -T - -H "Transfer-Encoding:" -H "Expect:" \
                -H "Content-Length: $slice" -H "Content-Range: bytes $((k * slice))-$(((k + 1) * slice - 1))/*" \
                -o /dev/null "http://localhost/images/$1?flush=n" & pids+=($!)
    done
    wait "${pids[@]}" || die "curl PUT into ticket $1 failed"
    curl -sf --unix-socket "$WORK/daemon/local.sock" -X PATCH -H 'Content-Type: application/json' \
        -d '{"op":"flush"}' -o /dev/null "http://localhost/images/$1" || die "curl flush of ticket $1 failed"
}
curl_get() { # ticket-id file-or-null
    local k pids=() range slice=$((BYTES / GET_STREAMS))
    for ((k = 0; k < GET_STREAMS; k++)); do
        range=$((k * slice))-$(((k + 1) * slice - 1))
        if [ "$2" = null ]; then
            curl -sf --unix-socket "$WORK/daemon/local.sock" -r "$range" -o /dev/null "http://localhost/images/$1" &
        else
            curl -sf --unix-socket "$WORK/daemon/local.sock" -r "$range" "http://localhost/images/$1" |
                dd of="$2" bs=1M seek=$((k * slice >> 20)) conv=notrunc status=none &
        fi
        pids+=($!)
    done
    wait "${pids[@]}" || die "curl GET of ticket $1 failed"
}
timed_curl() { # key fn args...
    local key=$1 d0 t0 t1; shift
    d0=$(ticks "$DPID"); t0=$(now); "$@"; t1=$(now)
    record "$key" "$t0" "$t1" - 0 "$d0"
    echo "  $key: $(mbps "$t0" "$t1") MB/s" >&2
}

V2V_FLAGS=(--request-size=4194304 --requests=16 --flush)
DST=$WORK/dst.raw
check_dst() { cmp -s "$SRC" "$DST" || die "$1: the image differs from the source"; }

for ((rep = 1; rep <= REPS; rep++)); do
    # Alternate who goes first, so neither always finds the caches warm.
    if (( rep % 2 )); then order=(bridge peer); else order=(peer bridge); fi
    for flags in defaults v2v; do
        want write || continue
        if [ $flags = v2v ]; then extra=("${V2V_FLAGS[@]}"); else extra=(); fi
        # Untimed warm-up: the first write of a kind after the others runs
        # a third slower whoever makes it (measured: 325-333 MB/s against
        # 670-700 for the second, round after round), so nobody makes it.
        rm -f "$DST"; truncate -s "$BYTES" "$DST"
        serve_image "$DST" "u$rep$flags"
        nbdcopy "${extra[@]}" "$SRC" "nbd+unix:///?socket=$WORK/q.sock"
        stop "$QPID"; QPID=
        for who in "${order[@]}"; do
            [ $who = peer ] && [ -z "$PLUGIN" ] && continue
            rm -f "$DST"; truncate -s "$BYTES" "$DST"
            serve_image "$DST" "w$rep$flags$who"
            rm -f "$WORK/w.sock"
            # Start from a clean page cache: a run without --flush leaves a
            # GiB of dirty pages that whoever comes next would pay for.
            sync
            if [ $who = bridge ]; then
                start "$BIN" serve --imageio-url "$URL" --socket "$WORK/w.sock"
                timed_nbdcopy "write-$flags/$who" "$PID" "$SRC" "$LINE" "${extra[@]}"
            else
                nbdkit -U "$WORK/w.sock" --exit-with-parent python "$PLUGIN" \
                    url="$URL" size="$BYTES" is_ovirt_host=true 2>> "$WORK/log" & PID=$!; PIDS+=("$PID")
                wait_sock "$WORK/w.sock"
                timed_nbdcopy "write-$flags/$who" "$PID" "$SRC" "nbd+unix:///?socket=$WORK/w.sock" "${extra[@]}"
            fi
            stop "$PID"
            stop "$QPID"; QPID=
            check_dst "write-$flags/$who"
        done
        if [ $flags = v2v ]; then
            rm -f "$DST"; truncate -s "$BYTES" "$DST"
            serve_image "$DST" "k$rep$flags"
            sync
            timed_curl "write-$flags/curl" curl_put "k$rep$flags"
            stop "$QPID"; QPID=
            check_dst "write-$flags/curl"
        fi
        # The ceiling of any writer through the daemon: nbdcopy straight
        # into the same qemu-nbd on a fresh file, no HTTP.
        rm -f "$DST"; truncate -s "$BYTES" "$DST"
        serve_image "$DST" "c$rep$flags"
        sync
        d0=$(ticks "$DPID"); t0=$(now)
        nbdcopy "${extra[@]}" "$SRC" "nbd+unix:///?socket=$WORK/q.sock"
        t1=$(now); record "write-$flags/ceiling" "$t0" "$t1" - 0 "$d0"
        stop "$QPID"; QPID=
        check_dst "write-$flags/ceiling"
    done

    # Downloads of one ticket over the source.
    if want download; then
    serve_image "$SRC" "r$rep"
    cat "$SRC" > /dev/null
    for who in "${order[@]}"; do
        rm -f "$DST" "$WORK/r.sock"
        if [ $who = bridge ]; then
            start "$BIN" serve --imageio-url "$URL" --read-only --socket "$WORK/r.sock"
            timed_nbdcopy "download/$who" "$PID" "$LINE" "$DST"
            check_dst "download/$who"
            stop "$PID"
        else
            d0=$(ticks "$DPID"); t0=$(now)
            "$PY" tests/imageio/client.py download "$URL" "$DST" raw
            t1=$(now); record "download/$who" "$t0" "$t1" - 0 "$d0"
            check_dst "download/$who"
        fi
    done
    rm -f "$DST"; truncate -s "$BYTES" "$DST"
    timed_curl download/curl curl_get "r$rep" "$DST"
    check_dst download/curl
    timed_curl download/curl-null curl_get "r$rep" null
    stop "$QPID"; QPID=
    fi

    # URL reads: our data server, one file ticket over the source.
    if want url; then
    rm -f "$WORK/ctl.sock" "$WORK/local.sock"
    start "$BIN" imageio --listen 127.0.0.1:0 --control-socket "$WORK/ctl.sock" --local-socket "$WORK/local.sock"
    IPID=$PID; BASE=$LINE
    curl -sf --unix-socket "$WORK/ctl.sock" -X PUT "http://localhost/tickets/u$rep" \
        -d "{\"uuid\":\"u$rep\",\"size\":$BYTES,\"url\":\"file://$SRC\",\"timeout\":3600,\"ops\":[\"read\"]}" \
        || die "cannot add ticket u$rep"
    for who in "${order[@]}"; do
        rm -f "$WORK/r.sock"
        if [ $who = bridge ]; then
            start "$BIN" serve --imageio-url "${BASE}u$rep" --read-only --socket "$WORK/r.sock"
            timed_nbdcopy "url-read/$who" "$PID" "$LINE" null:
        else
            nbdkit -U "$WORK/r.sock" --exit-with-parent curl url="${BASE}u$rep" 2>> "$WORK/log" & PID=$!; PIDS+=("$PID")
            wait_sock "$WORK/r.sock"
            timed_nbdcopy "url-read/$who" "$PID" "nbd+unix:///?socket=$WORK/r.sock" null:
        fi
        stop "$PID"
    done
    stop "$IPID"
    fi

    # The embedded pipeline against qemu-nbd on a plain file.
    for who in "${order[@]}"; do
        want embedded || continue
        if [ $who = bridge ]; then
            disk=bench$rep
            start "$BIN" serve --disk "$disk" --size "${SIZE_MIB}M" --data-dir "$WORK/data" --socket "$WORK/e.sock"
            timed_nbdcopy "embedded-write/$who" "$PID" "$SRC" "$LINE" --flush
            wait "$PID" || die "upload serve failed (see $WORK/log)"
            find "$WORK/data" -type f -size +1M -exec cat {} + > /dev/null
            start "$BIN" serve --disk "$disk" --direction download --data-dir "$WORK/data" --socket "$WORK/e.sock"
            timed_nbdcopy "embedded-read/$who" "$PID" "$LINE" null:
            wait "$PID" || die "download serve failed (see $WORK/log)"
            rm -rf "$WORK/data"
        else
            rm -f "$DST" "$WORK/q2.sock"; truncate -s "$BYTES" "$DST"
            qemu-nbd -f raw --shared=0 --persistent -k "$WORK/q2.sock" "$DST" & PID=$!; PIDS+=("$PID")
            wait_sock "$WORK/q2.sock"
            timed_nbdcopy "embedded-write/$who" "$PID" "$SRC" "nbd+unix:///?socket=$WORK/q2.sock" --flush
            timed_nbdcopy "embedded-read/$who" "$PID" "nbd+unix:///?socket=$WORK/q2.sock" null:
            stop "$PID"
        fi
    done
    echo "round $rep done" >&2
done

# --- the machine's limits, same run -----------------------------------------
t0=$(now); dd if="$SRC" of=/dev/null bs=8M status=none; t1=$(now)
CACHE=$(mbps "$t0" "$t1")
dd if=/dev/null of="$SRC" oflag=nocache conv=notrunc,fdatasync count=0 status=none
t0=$(now); dd if="$SRC" of=/dev/null bs=8M iflag=direct status=none; t1=$(now)
DREAD=$(mbps "$t0" "$t1")
t0=$(now); dd if="$SRC" of="$DST" bs=8M oflag=direct conv=fsync status=none; t1=$(now)
DWRITE=$(mbps "$t0" "$t1")
LOOP=$("$PY" - "$BYTES" <<'EOF'
import socket, sys, threading, time
n = int(sys.argv[1]); buf = bytes(1 << 20)
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
def sink():
    c, _ = srv.accept(); left = n
    while left > 0:
        left -= len(c.recv(1 << 20))
t = threading.Thread(target=sink); t.start()
s = socket.create_connection(srv.getsockname()); t0 = time.monotonic(); sent = 0
while sent < n:
    s.sendall(buf); sent += len(buf)
t.join(); print("%.1f" % (n / 1e6 / (time.monotonic() - t0)))
EOF
)

# --- the table ---------------------------------------------------------------
med() { [ -n "${1:-}" ] && median $1 || echo "-"; }
ratio() { [ "$1" = - ] || [ "$2" = - ] && echo "-" || echo "scale=2; $1 / $2" | bc; }
echo
echo "${SIZE_MIB} MiB random data, median of $REPS alternating rounds, $(nproc) cores, load: $(cut -d' ' -f1-3 /proc/loadavg)"
# verdict: met; "ceiling" when the target lies above curl's own figure
# through the same daemon (measured above, same rounds); else missed.
verdict() { # ratio target peer curl
    [ "$1" = - ] && { echo -; return; }
    if [ "$(echo "$1 >= $2" | bc)" = 1 ]; then echo met
    elif [ "$4" != - ] && [ "$(echo "$2 * $3 > $4" | bc)" = 1 ]; then echo ceiling
    else echo MISSED; fi
}
printf '%-15s %9s %9s %6s %7s %8s | %8s %8s %7s %7s | %6s %6s\n' \
    row "bridge" "peer" ratio target verdict "CPU s/G" "peer s/G" "RSS MiB" "peerRSS" "dmn%" "peer%"
printf '%-15s %9s %9s %6s %7s %8s | %8s %8s %7s %7s | %6s %6s\n' \
    "" "MB/s" "MB/s" "" "" "" "bridge" "" "bridge" "MiB" "bridge" "dmn%"
for row in write-defaults:2 write-v2v:1.2 download:1.5 url-read:2 embedded-read:0.9 embedded-write:1; do
    key=${row%%:*}; target=${row##*:}
    b=$(med "${MB[$key/bridge]:-}"); p=$(med "${MB[$key/peer]:-}"); r=$(ratio "$b" "$p")
    printf '%-15s %9s %9s %6s %6sx %8s | %8s %8s %7s %7s | %6s %6s\n' "$key" "$b" "$p" "$r" "$target" \
        "$(verdict "$r" "$target" "$p" "$(med "${MB[$key/curl]:-}")")" \
        "$(med "${CPU[$key/bridge]:-}")" "$(med "${CPU[$key/peer]:-}")" \
        "$(( ${RSS[$key/bridge]:-0} / 1024 ))" "$(( ${RSS[$key/peer]:-0} / 1024 ))" \
        "$(med "${DCPU[$key/bridge]:-}")" "$(med "${DCPU[$key/peer]:-}")"
done
echo "peers: write = virt-v2v ovirt-upload plugin (nbdkit python, is_ovirt_host=true: the daemon's unix"
echo "       socket, as the bridge finds it), download = ovirt_imageio.client,"
echo "       url-read = nbdkit-curl (both on our data server: the daemon has no HEAD), embedded = qemu-nbd on a plain file; dmn% = the imageio daemon's"
echo "       CPU (100% = one core: the daemon is the ceiling); peer s/G for the client = not measured."
for flags in defaults v2v; do
    c=$(med "${MB[write-$flags/ceiling]:-}")
    [ "$c" = - ] || echo "ceiling: write-$flags straight into qemu-nbd (no daemon, no HTTP): $c MB/s;" \
        "bridge at $(ratio "$(med "${MB[write-$flags/bridge]:-}")" "$c") of it, peer at $(ratio "$(med "${MB[write-$flags/peer]:-}")" "$c")"
done
for row in write-v2v:1.2 download:1.5; do
    key=${row%%:*}; target=${row##*:}
    c=$(med "${MB[$key/curl]:-}"); p=$(med "${MB[$key/peer]:-}")
    [ "$c" = - ] && continue
    extra=
    [ $key = download ] && extra=", into /dev/null $(med "${MB[download/curl-null]:-}") MB/s"
    streams=$GET_STREAMS; [ $key = write-v2v ] && streams=$PUT_STREAMS
    echo "curl's own figure: $key by curl through the daemon's unix socket ($streams requests at once): $c MB/s$extra;" \
        "the target ${target}x the peer is $( [ "$p" = - ] && echo - || echo "scale=1; $target * $p / 1" | bc) MB/s, curl at $(ratio "$c" "$p")x the peer"
done
echo "limits: TCP loopback ${LOOP} MB/s, page cache read ${CACHE} MB/s, disk O_DIRECT read ${DREAD} MB/s, write ${DWRITE} MB/s"
