#!/usr/bin/env bash
# Starts Redis and three patchwire nodes on this machine, all on cluster.toml, on ports
# 8080, 8082 and 8083 (the simulator on 8081 runs on node a). Ctrl-C stops them all.
#
#   config/examples/cluster/run.sh
#   curl -N localhost:8082/streams/fleet                     # subscribe on node b
#   curl -s localhost:8083/streams | jq '.streams[0].lease'  # which node polls
#   kill -9 <pid of the node that polls>                     # another one takes over
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../../.."
cd "$root"
cargo build --release --quiet
# Where cargo put it: CARGO_TARGET_DIR when set (relative to the workspace), else target/.
target_dir="${CARGO_TARGET_DIR:-target}"
case "$target_dir" in /*) ;; *) target_dir="$root/$target_dir" ;; esac
bin="$target_dir/release/patchwire"
work="$(mktemp -d)"
pids=()
stop() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap stop EXIT INT TERM

redis-server --port 6379 --bind 127.0.0.1 --save "" --appendonly no --dir "$work" \
  --logfile "$work/redis.log" &
pids+=($!)
until redis-cli -p 6379 ping >/dev/null 2>&1; do sleep 0.1; done

start() { # name port simulator
  PATCHWIRE__CLUSTER__NODE_ID="$1" PATCHWIRE__SERVER__LISTEN="127.0.0.1:$2" \
  PATCHWIRE__SIMULATOR__ENABLED="$3" \
    "$bin" --config "$here/cluster.toml" 2> >(sed "s/^/[$1] /" >&2) &
  pids+=($!)
  echo "node $1: http://127.0.0.1:$2 (pid $!)"
}
start a 8080 true
start b 8082 false
start c 8083 false
wait
