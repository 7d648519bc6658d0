#!/usr/bin/env bash
# Proxy mode against a configured stream: the same simulated feed streamed N times as the
# configured stream `/streams/fleet` and as the dynamic stream of its URL
# (`/http://127.0.0.1:18181/feeds/fleet?X-Sd-Token=…`), measured by patchwire-load in one run.
#
#   benches/proxy/run.sh                  # 5,000 subscribers, 20 s each
#   N=1000 SECS=10 benches/proxy/run.sh
#
# Prints, for each: reach-all latency, server CPU per delivered event, RSS per idle
# subscriber, and the upstream polls the simulator answered for it. Binds 127.0.0.1 only.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
N=${N:-5000}
SECS=${SECS:-20}
OUT=${OUT:-$(mktemp -d /tmp/proxy-bench.XXXXXX)}
mkdir -p "$OUT"
TOKEN=proxy-bench-token-0123456789
PW=http://127.0.0.1:18180
FEED=http://127.0.0.1:18181/feeds/fleet

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -ge $((N + 1000)) ] || die "the fd limit $(ulimit -n) is too low for $N subscribers"
command -v jq >/dev/null || die "jq is needed to read patchwire-load's JSON reports"

log "building release binaries"
(cd "$ROOT" && cargo build --release -p patchwire -p patchwire-load --bin patchwire --bin patchwire-load 2>&1 | tail -1 >&2)
"$ROOT/target/release/patchwire" run --config "$ROOT/benches/proxy/patchwire.toml" >"$OUT/patchwire.log" 2>&1 &
PW_PID=$!
trap 'kill $PW_PID 2>/dev/null || true; wait 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 100); do curl -sf "$PW/healthz" >/dev/null && break; sleep 0.1; done

polls() { # stream-name-prefix: upstream requests of that stream so far
  curl -s "$PW/metrics" | awk -v p="patchwire_polls_total{stream=\"$1" 'index($0, p) == 1 {s+=$2} END {print s+0}'
}

run() { # label url marker
  local label=$1 url=$2 marker=$3 before after
  before=$(polls "${4:-}")
  log "$label: $N subscribers for ${SECS}s (load: $(cut -d' ' -f1-3 /proc/loadavg))"
  "$ROOT/target/release/patchwire-load" --url "$url" -n "$N" --duration "${SECS}s" \
    --marker "$marker" --pid "$PW_PID" --label "$label" --json "$OUT/$label.json" \
    >"$OUT/$label.txt" 2>&1 || log "patchwire-load reported a failure (see $OUT/$label.txt)"
  after=$(polls "${4:-}")
  jq -r --arg polls "$((after - before))" --arg window "$SECS" \
    '"| \(.label) | \(.readers) | \(.changes) | \(.missing) | \(.reach_all_ms.p50 // 0 | . * 10 | round / 10) | \(.reach_all_ms.p99 // 0 | . * 10 | round / 10) | \(.server.cpu_us_per_event // 0 | . * 10 | round / 10) | \(.server.rss_per_idle_subscriber_kib | . * 100 | round / 100) | \($polls) |"' \
    "$OUT/$label.json" >>"$OUT/table.md"
}

echo "| run | subscribers | changes judged | missing | reach-all p50 ms | p99 ms | CPU µs/event | RSS KiB/idle subscriber | upstream polls |" >"$OUT/table.md"
echo "|---|---|---|---|---|---|---|---|---|" >>"$OUT/table.md"
run configured "$PW/streams/fleet" "id: fleet:" fleet
# The dynamic stream's name (a keyed hash, fixed for this process) marks its event ids.
# (curl times out on the endless stream: that is expected.)
NAME=$( (curl -s -m 2 -D - -o /dev/null "$PW/$FEED?X-Sd-Token=$TOKEN" || true) | tr -d '\r' |
  awk -F': ' 'tolower($1)=="x-patchwire-stream" {print $2}')
[ -n "$NAME" ] || die "the proxy did not name a dynamic stream"
run dynamic "$PW/$FEED?X-Sd-Token=$TOKEN" "id: $NAME:" "~"
log "machine: $(nproc) cores, $(uname -r); outputs in $OUT"
cat "$OUT/table.md"
