#!/usr/bin/env bash
# Broker sinks: changes published with acknowledgement per second, and publish-to-consume
# latency, against Debian's nats-server (JetStream, file storage) and redis-server started here
# on free loopback ports with empty stores, one after the other.
#
#   benches/brokers/run.sh                       # RATE=0 (as fast as possible), then 1000/s
#   RUNS="0 2000" SECONDS_EACH=5 STREAMS=4 benches/brokers/run.sh
#
# Binds 127.0.0.1 only; every server it starts is stopped at exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
RUNS=${RUNS:-"0 1000"}
SECONDS_EACH=${SECONDS_EACH:-10}
STREAMS=${STREAMS:-4}
DIR=$(mktemp -d /tmp/broker-bench.XXXXXX)

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

PIDS=()
stop() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done; PIDS=(); }
trap stop EXIT INT TERM

log "building the example"
(cd "$ROOT" && cargo build --release --example broker_load 2>&1 | tail -1 >&2)
LOAD="${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/broker_load"

for rate in $RUNS; do
  port=$(free_port)
  nats-server -js -a 127.0.0.1 -p "$port" -sd "$DIR/nats-$rate-$port" -l "$DIR/nats-$port.log" &
  PIDS+=($!)
  sleep 0.5
  log "nats: rate $rate, $SECONDS_EACH s, $STREAMS streams, load $(cut -d' ' -f1 /proc/loadavg)"
  "$LOAD" nats "nats://127.0.0.1:$port" "$rate" "$SECONDS_EACH" "$STREAMS"
  stop

  port=$(free_port)
  redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no --dir "$DIR" \
    --logfile "$DIR/redis-$port.log" &
  PIDS+=($!)
  sleep 0.5
  log "redis: rate $rate, $SECONDS_EACH s, $STREAMS streams, load $(cut -d' ' -f1 /proc/loadavg)"
  "$LOAD" redis "redis://127.0.0.1:$port" "$rate" "$SECONDS_EACH" "$STREAMS"
  stop
done
