#!/usr/bin/env bash
# Fan-out with views (issue #14): N SSE subscribers spread over V views of one push stream
# against N subscribers of the whole stream, the same K changes, measured by patchwire-load
# (server CPU per delivered event from /proc, reach-all latency, RSS per idle subscriber), on
# a fresh server per measurement, alternating the two ROUNDS times so both see the same load.
#
#   benches/views/run.sh                           # 5,000 subscribers, 100 views, 20 changes
#   N=1000 V=10 K=10 ROUNDS=1 benches/views/run.sh
#   BODIES=each benches/views/run.sh               # only one kind of change (each, header)
#
# The stream's document has V entities `{"id":"e<i>","route":"r<i>",...}`; view i is
# `/streams/bench?route=r<i>` (an ad hoc view: one entity), and patchwire-load's repeatable
# --url spreads the subscribers over the V URLs round-robin (N/V each). Two kinds of change:
# - `each`: every entity's `m` changes (it carries the change's MARK): each view's subscribers
#   get a one-operation patch of their entity, the whole stream's a patch of all V entities;
# - `header`: only `/header/m` changes: the whole stream and every view send the same
#   one-operation patch, so the difference is only what views cost the server (every view is
#   rebuilt, diffed and framed on each change).
# "B received per change" is everything after the response heads (SSE fields, the first
# snapshot included) over the changes delivered (patchwire-load's per-event figure counts each
# MARK, and a whole-stream `each` patch carries V of them).
# Binds 127.0.0.1 only. Prints a markdown table; raw outputs stay in $OUT.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
N=${N:-5000}
V=${V:-100}
K=${K:-20}
ROUNDS=${ROUNDS:-2}
BODIES=${BODIES:-"each header"}
OUT=${OUT:-$(mktemp -d /tmp/views-bench.XXXXXX)}
mkdir -p "$OUT"
export PATCHWIRE_PUSH_TOKEN=views-bench-token-0123456789
PW=http://127.0.0.1:18380

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -ge $((N + 1000)) ] || die "the fd limit $(ulimit -n) is too low for $N subscribers"
command -v jq >/dev/null || die "jq is needed to read patchwire-load's JSON reports"
[ "$V" -ge 1 ] && [ "$V" -le "$N" ] || die "V must be 1 to N"

log "building release binaries"
(cd "$ROOT" && cargo build --release -p patchwire -p patchwire-load --bin patchwire --bin patchwire-load 2>&1 | tail -1 >&2)
# The binaries measured, kept with the results (a shared target directory may be rebuilt meanwhile).
cp "$TARGET/release/patchwire" "$TARGET/release/patchwire-load" "$OUT/"

# The body template of kind $1 (@@K@@ is the change number).
template() {
  local entities="" i
  for i in $(seq 0 $((V - 1))); do
    [ -n "$entities" ] && entities+=","
    case $1 in
      each) entities+="{\"id\":\"e$i\",\"route\":\"r$i\",\"m\":\"MARK@@K@@;\"}" ;;
      header) entities+="{\"id\":\"e$i\",\"route\":\"r$i\",\"m\":\"-\"}" ;;
    esac
  done
  case $1 in
    each) printf '{"header":{"m":"-"},"entity":[%s]}' "$entities" ;;
    header) printf '{"header":{"m":"MARK@@K@@;"},"entity":[%s]}' "$entities" ;;
    *) die "unknown kind of change $1 (each, header)" ;;
  esac
}

VIEW_URLS=()
for i in $(seq 0 $((V - 1))); do VIEW_URLS+=(--url "$PW/streams/bench?route=r$i"); done

PW_PID=
stop() { [ -n "$PW_PID" ] && kill "$PW_PID" 2>/dev/null && wait "$PW_PID" 2>/dev/null; PW_PID=; }
trap 'stop || true' EXIT INT TERM

measure() { # label, kind of change, then patchwire-load's --url arguments
  local label=$1 kind=$2
  shift 2
  local body
  body=$(template "$kind")
  "$OUT/patchwire" run --config "$ROOT/benches/views/patchwire.toml" >"$OUT/$label.log" 2>&1 &
  PW_PID=$!
  for _ in $(seq 100); do curl -sf "$PW/healthz" >/dev/null && break; sleep 0.1; done
  # A first document, so that every subscriber (and every view) starts from a snapshot and
  # then gets patches.
  curl -sf -H "Authorization: Bearer $PATCHWIRE_PUSH_TOKEN" -H "Content-Type: application/json" \
    --data-binary "${body//@@K@@/0}" "$PW/streams/bench" >/dev/null || die "priming failed"
  local load
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  log "$label: $N subscribers, $K changes (load: $load)"
  "$OUT/patchwire-load" "$@" -n "$N" -k "$K" --interval 200ms --body-template "$body" \
    --publish-url "$PW/streams/bench" --header "Authorization: Bearer $PATCHWIRE_PUSH_TOKEN" \
    --pid "$PW_PID" --label "$label" --json "$OUT/$label.json" \
    >"$OUT/$label.txt" 2>&1 || log "patchwire-load reported a failure (see $OUT/$label.txt)"
  curl -s "$PW/metrics" | grep -E '^patchwire_views?(_|\{)' >"$OUT/$label.metrics" || true
  stop || true
  jq -r --arg load "$load" --arg kind "$kind" --arg urls "$(($# / 2))" \
    '"| \(.label) | \($kind) | \($urls) | \(.readers) | \(.delivered) | \(.missing) | \(.wire_bytes_per_event * (.delivered + .duplicates) / .delivered | round) | \(.reach_all_ms.p50 // 0 | . * 10 | round / 10) | \(.reach_all_ms.max // 0 | . * 10 | round / 10) | \(.server.cpu_us_per_event // 0 | . * 100 | round / 100) | \(.server.rss_per_idle_subscriber_kib | . * 100 | round / 100) | \($load) |"' \
    "$OUT/$label.json" >>"$OUT/table.md"
}

echo "| run | change | URLs | subscribers | delivered | missing | B received per change | reach-all p50 ms | max ms | CPU µs/event | RSS KiB/idle subscriber | load average |" >"$OUT/table.md"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|" >>"$OUT/table.md"
for round in $(seq "$ROUNDS"); do
  for kind in $BODIES; do
    measure "whole-$kind-$round" "$kind" --url "$PW/streams/bench"
    measure "views-$kind-$round" "$kind" "${VIEW_URLS[@]}"
  done
done
log "machine: $(nproc) cores, $(uname -r); outputs in $OUT"
cat "$OUT/table.md"
