#!/usr/bin/env bash
# The cluster benchmarks of issue 13, in one run on one machine:
#
#   fanout    5,000 SSE subscribers, 10 changes (benches/fanout's scenario a) on one node
#             without Redis (the baseline), on one node with Redis, on three nodes behind one
#             Redis with every subscriber on the first, and spread over the three; plus a
#             light run (few subscribers, many changes) where the Redis hop is not buried under
#             the fan-out's queueing. Rounds alternate the setups ($SETUPS).
#   cost      Redis commands and bytes per change (INFO commandstats / stats over N changes,
#             minus an idle window of the same length).
#   memory    Redis memory of one stream with history = 1000 of real MBTA trip updates
#             (../shared/data, polled from a replaying upstream), with the default byte budget
#             and without one (1 GiB).
#   failover  10 SIGKILLs and 5 SIGTERMs of the lease holder of a polled stream: the gap in
#             changes subscribers see, and when another node took the lease.
#
#   benches/cluster/run.sh                          # everything; prints markdown at the end
#   PARTS="fanout" ROUNDS=1 benches/cluster/run.sh  # some parts
#   SETUPS="single cluster3" PARTS=fanout benches/cluster/run.sh
#   N_DIV=10 KILLS=2 TERMS=1 benches/cluster/run.sh # a quick check of the script itself
#   OUT=/tmp/cluster-run1 benches/cluster/run.sh    # keep outputs in a chosen directory
#
# Needs: cargo, redis-server and redis-cli, python3, jq, curl. Every process (Redis included)
# binds a free port on 127.0.0.1 and is stopped at the end. Binaries go to CARGO_TARGET_DIR
# (default target/). Raw outputs stay in $OUT (printed at the end).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/benches/cluster
DATA=${DATA:-$ROOT/../shared/data}
PARTS=${PARTS:-"fanout cost memory failover"}
ROUNDS=${ROUNDS:-3}
# Divide every subscriber count by this, for a quick check of the script itself.
N_DIV=${N_DIV:-1}
KILLS=${KILLS:-10}
TERMS=${TERMS:-5}
# Changes measured by the cost part; changes the memory part waits for.
COST_CHANGES=${COST_CHANGES:-200}
MEMORY_CHANGES=${MEMORY_CHANGES:-1100}
OUT=${OUT:-$(mktemp -d /tmp/cluster-bench.XXXXXX)}
mkdir -p "$OUT"
export PATCHWIRE_PUSH_TOKEN=${PATCHWIRE_PUSH_TOKEN:-cluster-bench-token-$RANDOM$RANDOM}
AUTH="Authorization: Bearer $PATCHWIRE_PUSH_TOKEN"
TRIPS=$DATA/gtfs-rt/sequences/mbta-lamp/tripupdates-2023-05-08T12Z

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -ge 6000 ] || die "the fd limit $(ulimit -n) is too low for 5,000 subscribers"
for tool in redis-server redis-cli python3 jq curl; do
  command -v $tool >/dev/null || die "$tool is needed (Debian: apt-get install redis-server jq curl python3)"
done

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ---------------------------------------------------------------- build
log "building release binaries"
(cd "$ROOT" && cargo build --release -p patchwire -p patchwire-load --bin patchwire --bin patchwire-load 2>&1 | tail -2 >&2)
TARGET_DIR=${CARGO_TARGET_DIR:-target}
case $TARGET_DIR in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
PATCHWIRE=$TARGET_DIR/release/patchwire
LOAD=$TARGET_DIR/release/patchwire-load

# ---------------------------------------------------------------- processes
# A fresh redis-server on a free port, persistence off: REDIS_PORT, REDIS_PID, REDIS_URL.
start_redis() { # tag
  REDIS_PORT=$(free_port)
  local dir=$OUT/redis-$1
  mkdir -p "$dir"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
    --logfile "$dir/redis.log" &
  REDIS_PID=$!; PIDS+=("$REDIS_PID")
  REDIS_URL=redis://127.0.0.1:$REDIS_PORT
  for _ in $(seq 100); do rcli ping >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "redis-server did not start (see $dir/redis.log)"
}
rcli() { redis-cli -p "$REDIS_PORT" "$@"; }

declare -A NODE_PID NODE_PORT
# A patchwire node on a free port: `cluster` joins $REDIS_URL as node NAME, `single` runs
# the same file without Redis. Extra VAR=value arguments go to its environment.
start_node() { # name config single|cluster [VAR=value...]
  local name=$1 config=$2 mode=$3; shift 3
  local port; port=$(free_port)
  local env=(PATCHWIRE__SERVER__LISTEN=127.0.0.1:$port "$@")
  [ "$mode" = cluster ] && env+=(PATCHWIRE__CLUSTER__REDIS="$REDIS_URL" PATCHWIRE__CLUSTER__NODE_ID="$name")
  env "${env[@]}" "$PATCHWIRE" run --config "$HERE/$config" >"$OUT/node-$name.log" 2>&1 &
  NODE_PID[$name]=$!; NODE_PORT[$name]=$port; PIDS+=("$!")
  local path=/healthz; [ "$mode" = cluster ] && path=/readyz
  for _ in $(seq 200); do
    curl -sf -o /dev/null "http://127.0.0.1:$port$path" && return 0
    kill -0 "${NODE_PID[$name]}" 2>/dev/null || die "node $name exited (see $OUT/node-$name.log)"
    sleep 0.05
  done
  die "node $name is not ready on $port (see $OUT/node-$name.log)"
}

stop_all() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  PIDS=()
  NODE_PID=() NODE_PORT=()
  sleep 1
}

url() { echo "http://127.0.0.1:${NODE_PORT[$1]}/streams/bench"; }

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# The padding of patchwire-load's bodies (its default template): the body is `size` bytes for
# change 99 (or the last, if fewer), so every body of a run has the same pad.
BARE='{"m":"MARK99;","pad":""}'
pad() { head -c "$(($1 - ${#BARE}))" /dev/zero | tr '\0' x; }

# A fresh push stream's first change is a snapshot (the whole document): publish change 0
# with the run's padding first, so every measured change is a patch, as in steady state (as
# benches/fanout does).
prime() { # node body_size
  curl -sf -o /dev/null -H "$AUTH" --data-binary "{\"m\":\"MARK0;\",\"pad\":\"$(pad "$2")\"}" "$(url "$1")" \
    || die "priming the push stream on node $1 failed"
}

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "commit: $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet || echo ' (with uncommitted changes)')"
  echo "machine: $(nproc) CPUs, $(uname -sr), $(lscpu | sed -n 's/^Model name: *//p'), $(free -g | awk '/^Mem:/ {print $2}') GiB"
  echo "redis: $(redis-server --version)"
  echo "load before: $(uptime)"
} >"$OUT/machine.txt"

# ---------------------------------------------------------------- fanout
FANOUT_TABLE=$OUT/fanout.md
fanout_header() {
  echo "| run | setup | node | subscribers | delivered | missing | p50 ms | p90 ms | p99 ms | max ms | reach-all p50 ms | CPU µs per delivered event | CPU s per process | load avg |" >"$FANOUT_TABLE"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" >>"$FANOUT_TABLE"
}

# The setups: which nodes run, and which of them subscribers connect to (the first is
# published to).
#   single     one node, no Redis: the baseline
#   cluster1   one node with Redis: the Redis hop alone (the append's round trip)
#   cluster3a  three nodes, every subscriber on a: the hop, and b and c following the log
#   cluster3   three nodes, subscribers spread round-robin: what issue 13 asks for
SETUPS=${SETUPS:-"single cluster1 cluster3a cluster3"}
fanout_setup() { # setup tag
  case $1 in
    single) start_node a fanout.toml single ;;
    cluster1) start_redis "$2"; start_node a fanout.toml cluster ;;
    cluster3|cluster3a) start_redis "$2"; start_node a fanout.toml cluster
      start_node b fanout.toml cluster; start_node c fanout.toml cluster ;;
    *) die "unknown setup $1 (single cluster1 cluster3a cluster3)" ;;
  esac
}
fanout_running() { case $1 in single|cluster1) echo a ;; *) echo a b c ;; esac; }
fanout_subscribed() { case $1 in cluster3) echo a b c ;; *) echo a ;; esac; }

# One measurement of the running setup: subscribers spread over its subscribed nodes
# (publishing to the first); every node's PID measured (one per URL first, so patchwire-load
# gives each URL its CPU per event), and Redis's, which count in the total.
fanout_case() { # tag setup n k interval_ms
  local tag=$1 setup=$2 n=$3 k=$4 iv=$5
  local subscribed running urls=() pids=() names=() node
  read -ra subscribed <<<"$(fanout_subscribed "$setup")"
  read -ra running <<<"$(fanout_running "$setup")"
  for node in "${subscribed[@]}"; do urls+=(--url "$(url "$node")"); done
  for node in "${subscribed[@]}" "${running[@]}"; do
    # shellcheck disable=SC2076
    [[ " ${names[*]} " =~ " $node " ]] && continue
    names+=("$node"); pids+=(--pid "${NODE_PID[$node]}")
  done
  [ "$setup" != single ] && { names+=(redis); pids+=(--pid "$REDIS_PID"); }
  local first=${subscribed[0]}
  prime "$first" 430
  local loadavg; loadavg=$(cut -d' ' -f1 /proc/loadavg)
  log "fanout $tag: $setup, $n subscribers on ${subscribed[*]}, $k changes every ${iv} ms (load $loadavg)"
  "$LOAD" "${urls[@]}" --publish-url "$(url "$first")" --header "$AUTH" -n "$n" -k "$k" \
    --interval "${iv}ms" --body-size 430 "${pids[@]}" --label "$tag" --json "$OUT/$tag.json" \
    >"$OUT/$tag.txt" 2>&1 || log "patchwire-load reported a failure (see $OUT/$tag.txt)"
  cat "$OUT/$tag.txt" >&2
  [ -s "$OUT/$tag.json" ] || { echo "| $tag | $setup | failed: $(tail -1 "$OUT/$tag.txt") ||||||||||||" >>"$FANOUT_TABLE"; return; }
  jq -r --arg tag "$tag" --arg setup "$setup" --arg names "${names[*]}" --arg load "$loadavg" '
    def f: if . == null then "—" else (. * 100 | round / 100 | tostring) end;
    ($names | split(" ")) as $n |
    ([.server.processes | to_entries[] | "\($n[.key]) \(.value.cpu_s * 100 | round / 100)"] | join(", ")) as $each |
    (if (.targets | length) > 1 then
      [.targets | to_entries[] | .key as $i | .value |
        "| \($tag) | \($setup) | \($n[$i]) | \(.readers) | \(.delivered) | \(.missing) | \(.latency_ms.p50 | f) | \(.latency_ms.p90 | f) | \(.latency_ms.p99 | f) | \(.latency_ms.max | f) | \(.reach_all_ms.p50 | f) | \(.cpu_us_per_event | f) | | \($load) |"]
     else [] end)[],
    "| \($tag) | \($setup) | **all** | \(.readers) | \(.delivered) | \(.missing) | \(.latency_ms.p50 | f) | \(.latency_ms.p90 | f) | \(.latency_ms.p99 | f) | \(.latency_ms.max | f) | \(.reach_all_ms.p50 | f) | \(.server.cpu_us_per_event | f) | \($each) | \($load) |"
  ' "$OUT/$tag.json" >>"$FANOUT_TABLE"
}

run_fanout() {
  fanout_header
  local round setup
  for round in $(seq "$ROUNDS"); do
    for setup in $SETUPS; do
      # a: benches/fanout's scenario a (5,000 subscribers, 10 changes every 200 ms).
      fanout_setup "$setup" "a$round-$setup"
      fanout_case "a$round-$setup" "$setup" $((5000 / N_DIV)) 10 200
      stop_all
      # light: 30 subscribers, 100 changes every 50 ms: the hop without fan-out queueing.
      fanout_setup "$setup" "l$round-$setup"
      fanout_case "l$round-$setup" "$setup" 30 100 50
      stop_all
    done
  done
}

# ---------------------------------------------------------------- cost
COST=$OUT/cost.md
# Sums of INFO commandstats calls (total), and net bytes in/out.
redis_counts() {
  local commandstats; commandstats=$(rcli info commandstats | tr -d '\r')
  echo "$commandstats" | sed -n 's/^cmdstat_\([a-z|]*\):calls=\([0-9]*\),.*/\1 \2/p'
  # The time scripts ran (their commands included), as Redis counts it.
  echo "$commandstats" | sed -n 's/^cmdstat_\(evalsha\|eval\):calls=[0-9]*,usec=\([0-9]*\),.*/usec_\1 \2/p'
  local stats; stats=$(rcli info stats | tr -d '\r')
  echo "net_in $(echo "$stats" | sed -n 's/^total_net_input_bytes://p')"
  echo "net_out $(echo "$stats" | sed -n 's/^total_net_output_bytes://p')"
  # Redis's own CPU (getrusage, µs resolution), main thread and children.
  rcli info cpu | tr -d '\r' | awk -F: '/^used_cpu_(sys|user):/ {s += $2} END {printf "cpu_us %.0f\n", s * 1e6}'
}

# Publishes `count` changes to node a, one every `gap` seconds; the pad changes when `whole`.
publish_series() { # count gap_s size small|whole
  local i pad; pad=$(pad "$3")
  for i in $(seq "$1"); do
    local body="{\"m\":\"MARK$i;\",\"pad\":\"$pad\"}"
    [ "$4" = whole ] && body="{\"m\":\"MARK$i;\",\"pad\":\"$i-$pad\"}"
    curl -sf -o /dev/null -H "$AUTH" --data-binary "$body" "$(url a)" || die "publish $i failed"
    sleep "$2"
  done
}

# Calls, bytes and Redis CPU of a window: each window RESETSTATs first (INFO's own calls are
# removed later); CPU is cumulative, so the window's is the difference.
window() { # file command...
  rcli config resetstat >/dev/null
  local cpu0; cpu0=$(redis_counts | awk '$1 == "cpu_us" {print $2}')
  "${@:2}"
  redis_counts >"$1"
  echo "cpu_window $(($(awk '$1 == "cpu_us" {print $2}' "$1") - cpu0))" >>"$1"
}

cost_case() { # label size kind
  local n=$COST_CHANGES gap=0.05 t0 t1 secs
  t0=$(date +%s.%N)
  window "$OUT/cost-$1-busy.txt" publish_series "$n" $gap "$2" "$3"
  t1=$(date +%s.%N); secs=$(echo "$t1 - $t0" | bc)
  window "$OUT/cost-$1-idle.txt" sleep "$secs"
  python3 - "$OUT/cost-$1-busy.txt" "$OUT/cost-$1-idle.txt" "$n" "$1" "$2" >>"$COST" <<'PY'
import sys
def read(path):
    out = {}
    for line in open(path):
        name, value = line.split()
        out[name] = int(value)
    return out
busy, idle, n, label, size = read(sys.argv[1]), read(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
# The INFO / CONFIG calls of the measurement itself are not the cluster's.
for counts in (busy, idle):
    for own in ("info", "config|resetstat"):
        counts.pop(own, None)
special = {"net_in", "net_out", "cpu_us", "cpu_window", "usec_evalsha", "usec_eval"}
names = sorted((set(busy) | set(idle)) - special,
               key=lambda c: -(busy.get(c, 0) - idle.get(c, 0)))
per = {c: (busy.get(c, 0) - idle.get(c, 0)) / n for c in names}
total = sum(v for c, v in per.items() if c not in ("evalsha", "eval"))
scripts = per.get("evalsha", 0) + per.get("eval", 0)
detail = ", ".join(f"{c} {v:.2f}" for c, v in per.items() if abs(v) >= 0.005)
# CPU is cumulative since Redis started (RESETSTAT does not reset it): the busy window's is
# its end minus the first snapshot's, passed as the difference of two files' readings.
print(f"| {label} | {size} | {n} | {scripts:.2f} | {total:.2f} | "
      f"{(busy['net_in'] - idle['net_in']) / n:.0f} | {(busy['net_out'] - idle['net_out']) / n:.0f} | "
      f"{(busy['cpu_window'] - idle['cpu_window']) / n:.0f} | "
      f"{(busy.get('usec_evalsha', 0) + busy.get('usec_eval', 0)) / max(1, busy.get('evalsha', 0) + busy.get('eval', 0)):.0f} | {detail} |")
PY
}

run_cost() {
  echo "| changes | body B | N | scripts per change | commands inside scripts and others per change | bytes in per change | bytes out per change | Redis CPU µs per change | µs per script run (commandstats) | per change, by command (busy − idle) |" >"$COST"
  echo "|---|---|---|---|---|---|---|---|---|---|" >>"$COST"
  start_redis cost
  start_node a fanout.toml cluster; start_node b fanout.toml cluster; start_node c fanout.toml cluster
  prime a 430
  sleep 1
  log "cost: $COST_CHANGES small changes (load $(cut -d' ' -f1 /proc/loadavg))"
  cost_case "3 nodes, fan-out bodies (94 B patch)" 430 small
  log "cost: $COST_CHANGES whole changes of 50 KB"
  cost_case "3 nodes, 50 KB changed whole" 51200 whole
  stop_all
}

# ---------------------------------------------------------------- memory
MEMORY=$OUT/memory.md
key_memory() { # stream
  local k
  for k in meta log snap lease; do
    echo "$k $(rcli memory usage "patchwire:{$1}:$k" samples 0 | tr -d '\r')"
  done
}

memory_case() { # label history_bytes|default
  start_redis "memory-$1"
  local base; base=$(rcli info memory | sed -n 's/^used_memory:\([0-9]*\).*/\1/p')
  local upstream_port; upstream_port=$(free_port)
  python3 "$HERE/replay_upstream.py" "$TRIPS" "$upstream_port" >"$OUT/upstream-$1.log" 2>&1 &
  PIDS+=("$!")
  sleep 0.5
  local env=(PATCHWIRE__STREAMS__0__URL=http://127.0.0.1:$upstream_port/tripupdates.pb)
  [ "$2" != default ] && env+=(PATCHWIRE__STREAMS__0__HISTORY_BYTES="$2")
  start_node a trips.toml cluster "${env[@]}"
  rcli config resetstat >/dev/null
  local seq0; seq0=$(rcli hget 'patchwire:{trips}:meta' seq | tr -d '\r'); seq0=${seq0:-0}
  local seq=0 t0; t0=$(date +%s)
  while [ "$seq" -lt "$MEMORY_CHANGES" ]; do
    sleep 5
    seq=$(rcli hget 'patchwire:{trips}:meta' seq | tr -d '\r'); seq=${seq:-0}
    log "memory $1: $seq changes logged"
    [ $(($(date +%s) - t0)) -lt 1200 ] || die "memory $1: only $seq changes after 20 minutes"
  done
  redis_counts >"$OUT/memory-$1-counts.txt"
  local seq_end; seq_end=$(rcli hget 'patchwire:{trips}:meta' seq | tr -d '\r')
  local used; used=$(rcli info memory | sed -n 's/^used_memory:\([0-9]*\).*/\1/p')
  key_memory trips >"$OUT/memory-$1-keys.txt"
  local xlen; xlen=$(rcli xlen 'patchwire:{trips}:log' | tr -d '\r')
  local snap_b; snap_b=$(rcli strlen 'patchwire:{trips}:snap' | tr -d '\r')
  local meta; meta=$(rcli hgetall 'patchwire:{trips}:meta' | tr -d '\r' | paste -sd' ')
  echo "$meta" >"$OUT/memory-$1-meta.txt"
  local log_bytes; log_bytes=$(rcli hget 'patchwire:{trips}:meta' log_bytes | tr -d '\r')
  awk -v label="$1" -v xlen="$xlen" -v snap="$snap_b" -v logb="$log_bytes" -v used=$((used - base)) \
      -v seq="$seq_end" -v seq0="$seq0" -v counts="$OUT/memory-$1-counts.txt" '
    { m[$1] = $2 }
    END {
      while ((getline line < counts) > 0) { split(line, f, " "); c[f[1]] = f[2] }
      calls = 0; for (k in c) if (k !~ /^(net_|cpu_|usec_)/ && k != "info" && k != "config|resetstat") calls += c[k]
      printf "| %s | %d | %d | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.0f | %.0f |\n",
        label, seq, xlen, logb / 1048576, m["log"] / 1048576, m["snap"] / 1048576, m["meta"] / 1024,
        (m["log"] + m["snap"] + m["meta"] + m["lease"]) / 1048576, used / 1048576, snap / 1024,
        c["net_in"] / (seq - seq0), calls / (seq - seq0)
    }' "$OUT/memory-$1-keys.txt" >>"$MEMORY"
  stop_all
}

run_memory() {
  [ -d "$TRIPS" ] || die "no recorded trip updates in $TRIPS (DATA=path/to/shared/data)"
  echo "| history_bytes | changes logged | log entries kept | their payload MiB (meta log_bytes) | MEMORY USAGE log MiB | snap MiB | meta KiB | stream's keys MiB | used_memory growth MiB | stored document KiB | bytes in per change | commands per change (all, incl. polls, leases, heartbeats) |" >"$MEMORY"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|" >>"$MEMORY"
  memory_case default default
  memory_case "1 GiB" "1 GiB"
}

# ---------------------------------------------------------------- failover
run_failover() {
  start_redis failover
  python3 "$HERE/failover.py" --patchwire "$PATCHWIRE" --config "$HERE/failover.toml" \
    --redis-port "$REDIS_PORT" --kills "$KILLS" --terms "$TERMS" --out "$OUT/failover" \
    >"$OUT/failover.md" 2>"$OUT/failover.log" || { tail -20 "$OUT/failover.log" >&2; die "failover.py failed"; }
  stop_all
}

for part in $PARTS; do
  case $part in
    fanout) run_fanout ;;
    cost) run_cost ;;
    memory) run_memory ;;
    failover) run_failover ;;
    *) die "unknown part $part (fanout cost memory failover)" ;;
  esac
done
echo "load after: $(uptime)" >>"$OUT/machine.txt"

echo
cat "$OUT/machine.txt"
for f in fanout.md cost.md memory.md failover.md; do
  [ -s "$OUT/$f" ] && { echo; echo "## $f"; echo; cat "$OUT/$f"; }
done
echo
echo "raw outputs: $OUT"
