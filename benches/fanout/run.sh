#!/usr/bin/env bash
# Fan-out comparison: patchwire vs floor.c (the smallest possible broadcaster) vs nginx+Nchan,
# the same scenarios, measured by two clients: the neutral ssebench.c and patchwire-load.
#
#   benches/fanout/run.sh                    # everything; prints a markdown table at the end
#   SCENARIOS="a c" SERVERS="patchwire floor" benches/fanout/run.sh
#   CLIENTS=load benches/fanout/run.sh       # patchwire-load only
#
# Needs: cargo, gcc, jq, root for apt-get (only when libnginx-mod-nchan is missing).
# Everything binds 127.0.0.1. Raw outputs stay in $OUT (printed at the end).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TOOLS=${TOOLS:-$ROOT/../shared/tools}
SCENARIOS=${SCENARIOS:-"a b c d e"}
SERVERS=${SERVERS:-"patchwire floor nchan"}
CLIENTS=${CLIENTS:-"ssebench load"}
OUT=${OUT:-$(mktemp -d /tmp/fanout.XXXXXX)}
mkdir -p "$OUT"
# Divide every subscriber count by this, for a quick check of the script itself.
N_DIV=${N_DIV:-1}
PW_PORT=18080 SIM_PORT=18081 NCHAN_PORT=18090 FLOOR_PORT=18095
export PATCHWIRE_PUSH_TOKEN=${PATCHWIRE_PUSH_TOKEN:-fanout-bench-token-$RANDOM$RANDOM}
TABLE=$OUT/table.md

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Each process holds up to 10,000 connections here; the load tool spreads over workers past
# its own limit.
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -ge 12000 ] || die "the fd limit $(ulimit -n) is too low for 10,000 subscribers"
command -v jq >/dev/null || die "jq is needed to tabulate patchwire-load's JSON reports"

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

wait_port() { # port
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  die "nothing listens on 127.0.0.1:$1"
}

# ---------------------------------------------------------------- build
log "building release binaries and the C tools"
(cd "$ROOT" && cargo build --release -p patchwire -p patchwire-load --bin patchwire --bin patchwire-load 2>&1 | tail -2 >&2)
PATCHWIRE=$ROOT/target/release/patchwire
LOAD=$ROOT/target/release/patchwire-load
gcc -O2 -o "$OUT/floor" "$TOOLS/floor.c"
sed 's/static char rb\[MAXFD\]\[1024\]/static char rb[MAXFD][65536]/' "$TOOLS/floor.c" >"$OUT/floor-big.c"
grep -q 'rb\[MAXFD\]\[65536\]' "$OUT/floor-big.c" || die "floor.c changed: cannot build floor-big"
gcc -O2 -o "$OUT/floor-big" "$OUT/floor-big.c"
gcc -O2 -o "$OUT/ssebench" "$TOOLS/ssebench.c"

# ---------------------------------------------------------------- servers
start_patchwire() {
  "$PATCHWIRE" run --config "$ROOT/benches/fanout/patchwire.toml" >"$OUT/patchwire.log" 2>&1 &
  PW_PID=$!; PIDS+=("$PW_PID")
  wait_port $PW_PORT
}

# floor.c reads a request into a 1 KiB buffer, so it cannot take the 50 KB publishes of
# scenarios c and d; for those it runs as floor-big, the same program with 64 KiB buffers
# (built from a copy, floor.c itself is untouched). a and b use floor.c as it is, so its RSS
# per idle subscriber is the original's.
start_floor() { # scenario
  local bin=$OUT/floor
  case $1 in c|d) bin=$OUT/floor-big ;; esac
  "$bin" $FLOOR_PORT >"$OUT/floor.log" 2>&1 &
  FLOOR_PID=$!; PIDS+=("$FLOOR_PID")
  wait_port $FLOOR_PORT
}

# nginx + Nchan with ONE worker process: the machine has 2 cores and the client needs one of
# them, like floor.c (single-threaded); a second Nchan worker would add inter-worker IPC
# through shared memory and compete with the client for the same cores.
start_nchan() {
  if ! dpkg -s libnginx-mod-nchan >/dev/null 2>&1; then
    log "installing nginx + libnginx-mod-nchan"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q libnginx-mod-nchan >&2
  fi
  local module=/usr/lib/nginx/modules/ngx_nchan_module.so
  [ -f "$module" ] || die "no $module after installing libnginx-mod-nchan"
  local dir=$OUT/nginx
  mkdir -p "$dir/logs" "$dir/tmp"
  cat >"$dir/nginx.conf" <<CONF
load_module $module;
daemon off;
worker_processes 1;
worker_rlimit_nofile 20000;
error_log $dir/logs/error.log warn;
pid $dir/nginx.pid;
events { worker_connections 19000; }
http {
  access_log off;
  client_body_temp_path $dir/tmp/body;
  proxy_temp_path $dir/tmp/proxy;
  fastcgi_temp_path $dir/tmp/fastcgi;
  uwsgi_temp_path $dir/tmp/uwsgi;
  scgi_temp_path $dir/tmp/scgi;
  client_max_body_size 1m;
  client_body_buffer_size 128k;
  server {
    listen 127.0.0.1:$NCHAN_PORT;
    location = /pub { nchan_publisher; nchan_channel_id bench; nchan_message_buffer_length 100; }
    location = /sub { nchan_subscriber eventsource; nchan_channel_id bench; }
  }
}
CONF
  nginx -p "$dir" -c "$dir/nginx.conf" >"$dir/logs/stdout.log" 2>&1 &
  NGINX_PID=$!; PIDS+=("$NGINX_PID")
  wait_port $NCHAN_PORT
  sleep 0.5 # the master binds before it forks its worker
  # Measure the master and its worker.
  NCHAN_PIDS=$NGINX_PID
  for child in $(ps -o pid= --ppid "$NGINX_PID"); do NCHAN_PIDS="$NCHAN_PIDS,$child"; done
}

# ---------------------------------------------------------------- scenarios
pad() { head -c "$1" /dev/zero | tr '\0' x; }

# server -> sub path, pub path, pids, extra publish header
target() {
  case $1 in
    patchwire) SUB=/streams/bench PUB=/streams/bench PORT=$PW_PORT SPIDS=$PW_PID
               HDR="Authorization: Bearer $PATCHWIRE_PUSH_TOKEN" ;;
    floor)     SUB=/ PUB=/ PORT=$FLOOR_PORT SPIDS=$FLOOR_PID HDR= ;;
    nchan)     SUB=/sub PUB=/pub PORT=$NCHAN_PORT SPIDS=$NCHAN_PIDS HDR= ;;
  esac
}

echo "| scenario | server | client | subs | changes | body B | wire B/event | delivered | missing | p50 ms | p90 ms | p99 ms | max ms | reach-all p50 ms | reach-all max ms | CPU µs/event | RSS KiB/idle sub | RSS growth during run KiB (peak above idle) |" >"$TABLE"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" >>"$TABLE"

# Every measurement runs on a freshly started server, so no run inherits another's memory
# (RSS per idle subscriber would otherwise read ~0 on the second client: the allocator reuses
# what the first run's connections left behind).
start_server() { # server scenario
  case $1 in
    patchwire) start_patchwire ;;
    floor) start_floor "$2" ;;
    nchan) start_nchan ;;
    *) die "unknown server $1 (patchwire, floor, nchan)" ;;
  esac
}

stop_servers() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  PIDS=()
  sleep 1
}

# scenario server client n k interval_ms body_bytes template_kind [stalled_fraction]
run_case() {
  local sc=$1 server=$2 client=$3 n=$(($4 / N_DIV)) k=$5 iv=$6 size=$7 kind=$8 stalled=${9:-0}
  target "$server"
  # Template: "small" changes one field (patchwire sends a ~60 B patch, the others the whole
  # body); "whole" changes the padded field too, so patchwire's patch carries the full size.
  local tmpl
  if [ "$kind" = whole ]; then tmpl='{"m":"MARK@@K@@;","pad":"@@K@@-@@PAD@@"}'; else tmpl='{"m":"MARK@@K@@;","pad":"@@PAD@@"}'; fi
  local tag="$sc-$server"
  # The padding patchwire-load computes: the body is `size` bytes for change min(k, 99), so
  # every body of a run has the same pad (only the change number varies).
  local bare=${tmpl//@@PAD@@/}; bare=${bare//@@K@@/$((k < 99 ? k : 99))}
  local padlen=$((size - ${#bare})); [ "$padlen" -ge 0 ] || padlen=0
  if [ "$server" = patchwire ]; then
    # A fresh stream's first change is a snapshot (the whole document); publish change 0
    # first so every measured change is a patch, as in steady state.
    local body0=${tmpl//@@PAD@@/$(pad "$padlen")}; body0=${body0//@@K@@/0}
    curl -sf -o /dev/null -H "$HDR" --data-binary "$body0" "http://127.0.0.1:$PORT$PUB" \
      || die "priming patchwire's push stream failed"
  fi
  log "scenario $sc: $server, $client, $n subscribers, $k changes of $size B every ${iv} ms, stalled $stalled (load: $(cut -d' ' -f1-3 /proc/loadavg))"
  if [ "$client" = ssebench ]; then
    # ssebench has no @@PAD@@: pad the template to the size here.
    local body=${tmpl//@@PAD@@/$(pad "$padlen")}
    local extra=""; [ -n "$HDR" ] && extra="$HDR"$'\r\n'
    "$OUT/ssebench" 127.0.0.1 "$PORT" "$SUB" "$n" "$PORT" "$PUB" "$body" "$k" "$iv" "$extra" "$SPIDS" \
      >"$OUT/$tag-ssebench.txt" 2>"$OUT/$tag-ssebench.err" || log "ssebench failed: $(tail -1 "$OUT/$tag-ssebench.err")"
    cat "$OUT/$tag-ssebench.txt" >&2
    sed -n 's/^subs=\([0-9]*\) msgs=\([0-9]*\) delivered=\([0-9]*\) missing=\([0-9]*\) | latency ms p50=\([0-9.]*\) p90=\([0-9.]*\) p99=\([0-9.]*\) max=\([0-9.]*\) mean=[0-9.]* | all-subs-reached per msg ms p50=\([0-9.]*\) max=\([0-9.]*\).*/\1 \2 \3 \4 \5 \6 \7 \8 \9/p;' "$OUT/$tag-ssebench.txt" >"$OUT/$tag.fields" || true
    local reach_max; reach_max=$(sed -n 's/.*all-subs-reached per msg ms p50=[0-9.]* max=\([0-9.]*\).*/\1/p' "$OUT/$tag-ssebench.txt")
    local srv; srv=$(sed -n 's/.*= \([0-9.]*\) kB\/sub; CPU .* = \([0-9.]*\) us\/delivery.*/\1 \2/p' "$OUT/$tag-ssebench.txt")
    if read -r subs msgs delivered missing p50 p90 p99 max reach50 <"$OUT/$tag.fields"; then
      read -r rss cpu <<<"${srv:-- -}"
      echo "| $sc | $server | ssebench | $subs | $msgs | $size | — | $delivered | $missing | $p50 | $p90 | $p99 | $max | $reach50 | $reach_max | $cpu | $rss | — |" >>"$TABLE"
    else
      echo "| $sc | $server | ssebench | $n | $k | $size | failed: $(tail -1 "$OUT/$tag-ssebench.err") |||||||||||" >>"$TABLE"
    fi
  else
    local headers=(); [ -n "$HDR" ] && headers=(--header "$HDR")
    "$LOAD" --url "http://127.0.0.1:$PORT$SUB" --publish-url "http://127.0.0.1:$PORT$PUB" "${headers[@]}" \
      -n "$n" -k "$k" --interval "${iv}ms" --body-template "$tmpl" --body-size "$size" \
      --stalled-fraction "$stalled" --pid "$SPIDS" --label "$tag" --json "$OUT/$tag-load.json" \
      >"$OUT/$tag-load.txt" 2>&1 || log "patchwire-load reported a failure (see $OUT/$tag-load.txt)"
    cat "$OUT/$tag-load.txt" >&2
    if [ -s "$OUT/$tag-load.json" ]; then
      jq -r --arg sc "$sc" --arg server "$server" --arg size "$size" --arg stalled "$stalled" '
        def f: if . == null then "—" else (. * 100 | round / 100 | tostring) end;
        "| \($sc) | \($server) | patchwire-load\(if $stalled != "0" then " (\($stalled) stalled)" else "" end) | \(.readers)+\(.stalled) | \(.changes) | \($size) | \(.wire_bytes_per_event | round) | \(.delivered) | \(.missing) | \(.latency_ms.p50 | f) | \(.latency_ms.p90 | f) | \(.latency_ms.p99 | f) | \(.latency_ms.max | f) | \(.reach_all_ms.p50 | f) | \(.reach_all_ms.max | f) | \(.server.cpu_us_per_event | f) | \(.server.rss_per_idle_subscriber_kib | f) | \(.server.rss_growth_kib) (peak \(.server.rss_peak_kib - .server.rss_idle_kib)) |"
      ' "$OUT/$tag-load.json" >>"$TABLE"
    else
      echo "| $sc | $server | patchwire-load | $n | $k | $size | failed: $(tail -1 "$OUT/$tag-load.txt") |||||||||||" >>"$TABLE"
    fi
  fi
  if [ "$server" = patchwire ]; then
    # Subscribers of the finished run must be gone (the client closed its connections).
    sleep 1
    local left; left=$(curl -s "http://127.0.0.1:$PW_PORT/metrics" | awk '/^patchwire_subscribers\{stream="bench"\}/ {print $2}')
    log "patchwire subscribers still registered after the run: ${left:-?}"
  fi
}

polls() { # total polls of the fleet stream
  curl -s "http://127.0.0.1:$PW_PORT/metrics" | awk '/^patchwire_polls_total\{.*stream="fleet"/ {s += $2} END {print s + 0}'
}

# (e) collapse: 10,000 subscribers on one polled stream; the upstream must still see one
# request per interval.
run_collapse() {
  local n=$((10000 / N_DIV)) secs=20
  log "scenario e: $n subscribers on the polled stream fleet for ${secs}s (load: $(cut -d' ' -f1-3 /proc/loadavg))"
  local before after t0 t1
  before=$(polls); t0=$(date +%s.%N)
  "$LOAD" --url "http://127.0.0.1:$PW_PORT/streams/fleet" -n $n --duration "${secs}s" --grace 3s \
    --marker "id: fleet:" --pid "$PW_PID" --label e-patchwire --json "$OUT/e-patchwire-load.json" \
    >"$OUT/e-patchwire-load.txt" 2>&1 || log "patchwire-load reported a failure (see $OUT/e-patchwire-load.txt)"
  after=$(polls); t1=$(date +%s.%N)
  cat "$OUT/e-patchwire-load.txt" >&2
  local elapsed; elapsed=$(echo "$t1 - $t0" | bc)
  echo "Collapse (e): $n subscribers on one polled stream (interval 1s): upstream polls during the run: $((after - before)) in ${elapsed}s (connect + ${secs}s watch); one per interval is $(printf '%.0f' "$elapsed")." >"$OUT/collapse.txt"
  if [ -s "$OUT/e-patchwire-load.json" ]; then
    jq -r '"  delivery: \(.readers) subscribers, \(.changes) changes judged, \(.delivered) delivered, \(.missing) missing, \(.out_of_order) out of order; reach-all p50 \(.reach_all_ms.p50 // 0 | . * 100 | round / 100) ms, max \(.reach_all_ms.max // 0 | . * 100 | round / 100) ms (first to last subscriber); server CPU \(.server.cpu_us_per_event // 0 | . * 10 | round / 10) µs/event, RSS \(.server.rss_per_idle_subscriber_kib | . * 100 | round / 100) KiB/subscriber"' "$OUT/e-patchwire-load.json" >>"$OUT/collapse.txt"
  fi
  cat "$OUT/collapse.txt" >&2
}

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "machine: $(nproc) CPUs, $(uname -sr), $(lscpu | sed -n 's/^Model name: *//p')"
  echo "load before: $(uptime)"
} >"$OUT/machine.txt"

for server in $SERVERS; do
  for sc in $SCENARIOS; do
    for client in $CLIENTS; do
      case $client in ssebench|load) ;; *) die "unknown client $client (ssebench, load)" ;; esac
      # ssebench cannot stall subscribers; the collapse scenario is patchwire's polled stream.
      { [ "$sc" = d ] && [ "$client" = ssebench ]; } && continue
      { [ "$sc" = e ] && { [ "$server" != patchwire ] || [ "$client" != load ]; }; } && continue
      start_server "$server" "$sc"
      case $sc in
        a) run_case a "$server" "$client" 5000 10 200 430 small ;;
        b) run_case b "$server" "$client" 10000 3 500 430 small ;;
        c) run_case c "$server" "$client" 3000 20 500 51200 whole ;;
        d) run_case d "$server" "$client" 3000 20 500 51200 whole 0.1 ;;
        e) run_collapse ;;
        *) die "unknown scenario $sc (a b c d e)" ;;
      esac
      stop_servers
    done
  done
done
echo "load after: $(uptime)" >>"$OUT/machine.txt"

echo
cat "$OUT/machine.txt"
echo
cat "$TABLE"
[ -f "$OUT/collapse.txt" ] && { echo; cat "$OUT/collapse.txt"; }
echo
echo "raw outputs: $OUT"
