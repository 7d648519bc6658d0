#!/usr/bin/env bash
# WebSocket against SSE: the same push stream, the same N subscribers, the same K changes,
# measured by patchwire-load in one run, alternating SSE and WebSocket (ROUNDS times each) on
# a fresh server per measurement so that both see the same machine load and neither inherits
# the other's memory.
#
#   benches/ws/run.sh                              # 5,000 subscribers, 20 changes, 2 rounds
#   N=1000 K=10 ROUNDS=1 benches/ws/run.sh
#
# Prints one row per measurement: reach-all latency, server CPU per delivered event and RSS
# per idle subscriber (from /proc), and the load average. Binds 127.0.0.1 only.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
N=${N:-5000}
K=${K:-20}
ROUNDS=${ROUNDS:-2}
OUT=${OUT:-$(mktemp -d /tmp/ws-bench.XXXXXX)}
mkdir -p "$OUT"
export PATCHWIRE_PUSH_TOKEN=ws-bench-token-0123456789
PW=http://127.0.0.1:18280

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -ge $((N + 1000)) ] || die "the fd limit $(ulimit -n) is too low for $N subscribers"
command -v jq >/dev/null || die "jq is needed to read patchwire-load's JSON reports"

log "building release binaries"
(cd "$ROOT" && cargo build --release -p patchwire -p patchwire-load --bin patchwire --bin patchwire-load 2>&1 | tail -1 >&2)
# The binaries measured, kept with the results (a shared target directory may be rebuilt meanwhile).
cp "$TARGET/release/patchwire" "$TARGET/release/patchwire-load" "$OUT/"

PW_PID=
stop() { [ -n "$PW_PID" ] && kill "$PW_PID" 2>/dev/null && wait "$PW_PID" 2>/dev/null; PW_PID=; }
trap 'stop || true' EXIT INT TERM

measure() { # label, then patchwire-load's transport arguments
  local label=$1
  shift
  "$OUT/patchwire" run --config "$ROOT/benches/ws/patchwire.toml" >"$OUT/$label.log" 2>&1 &
  PW_PID=$!
  for _ in $(seq 100); do curl -sf "$PW/healthz" >/dev/null && break; sleep 0.1; done
  # A first document, so that every subscriber starts from a snapshot and then gets patches.
  curl -sf -H "Authorization: Bearer $PATCHWIRE_PUSH_TOKEN" -d '{"m":"MARK0;","pad":""}' \
    "$PW/streams/bench" >/dev/null
  local load
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  log "$label: $N subscribers, $K changes (load: $load)"
  "$OUT/patchwire-load" "$@" -n "$N" -k "$K" --interval 200ms \
    --publish-url "$PW/streams/bench" --header "Authorization: Bearer $PATCHWIRE_PUSH_TOKEN" \
    --pid "$PW_PID" --label "$label" --json "$OUT/$label.json" \
    >"$OUT/$label.txt" 2>&1 || log "patchwire-load reported a failure (see $OUT/$label.txt)"
  stop || true
  jq -r --arg load "$load" \
    '"| \(.label) | \(.readers) | \(.delivered) | \(.missing) | \(.wire_bytes_per_event | round) | \(.reach_all_ms.p50 // 0 | . * 10 | round / 10) | \(.reach_all_ms.max // 0 | . * 10 | round / 10) | \(.server.cpu_us_per_event // 0 | . * 100 | round / 100) | \(.server.rss_per_idle_subscriber_kib | . * 100 | round / 100) | \($load) |"' \
    "$OUT/$label.json" >>"$OUT/table.md"
}

echo "| run | subscribers | delivered | missing | wire B/event | reach-all p50 ms | max ms | CPU µs/event | RSS KiB/idle subscriber | load average |" >"$OUT/table.md"
echo "|---|---|---|---|---|---|---|---|---|---|" >>"$OUT/table.md"
for round in $(seq "$ROUNDS"); do
  measure "sse-$round" --url "$PW/streams/bench"
  measure "ws-$round" --url "ws://127.0.0.1:18280/ws" \
    --ws-message '{"type":"subscribe","id":"b","stream":"bench"}'
done
log "machine: $(nproc) cores, $(uname -r); outputs in $OUT"
cat "$OUT/table.md"
