#!/usr/bin/env bash
# A quick A/B of the warm path between vmproxy binaries, interleaved in one run, as used for the
# figures in the 2026-11-26 closing note (the full comparison with nginx and axum-reverse-proxy
# is benches/run.sh):
#
#   benches/warm-ab.sh OLD_BINARY NEW_BINARY [ROUNDS]
#
# Each binary serves `/` through a process-backend route to nginx answering `return 200` with a
# 13-byte body; wrk -t1 -c32 -d5s after a 2 s warm-up; NEW is also run with the access log off.
# Prints one line per run (label, req/s, p50, p99). Needs nginx and wrk (Debian: nginx-light, wrk).
# OLD_TOP / NEW_TOP: top-level config lines for each binary, e.g. the same binary twice with
#   OLD_TOP="workers = 1" benches/warm-ab.sh target/release/vmproxy target/release/vmproxy
# OLD_LOG: RUST_LOG for OLD (default info, the access log on).
# Everything listens on 127.0.0.1; every process it starts is stopped before it exits.
set -euo pipefail
OLD=$(realpath "$1"); NEW=$(realpath "$2"); ROUNDS=${3:-3}
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
PORT=18700
cat >"$TMP/nginx.tmpl" <<CONF
worker_processes 1;
pid $TMP/nginx-PORT.pid;
error_log $TMP/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:PORT; location / { return 200 "hello, world!"; } }
}
CONF
cat >"$TMP/vm.toml" <<CONF
listen = "127.0.0.1:$PORT"
[[route]]
path = "/"
health_path = "/"
idle_timeout = "0s"
[route.process]
command = ["sh", "-c", "sed \"s/PORT/\$PORT/g\" $TMP/nginx.tmpl > $TMP/nginx-\$PORT.conf; exec $NGINX -c $TMP/nginx-\$PORT.conf -g 'daemon off;'"]
CONF
{ echo "${OLD_TOP:-}"; cat "$TMP/vm.toml"; } >"$TMP/old.toml"
{ echo "${NEW_TOP:-}"; cat "$TMP/vm.toml"; } >"$TMP/new.toml"
run() { # BIN LABEL RUST_LOG CONFIG
  RUST_LOG=$3 "$1" --config "$4" >"$TMP/$2.log" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$PORT/x" && break; sleep 0.1; done
  wrk -t1 -c32 -d2s "http://127.0.0.1:$PORT/x" >/dev/null 2>&1
  local out; out=$(wrk -t1 -c32 -d5s --latency "http://127.0.0.1:$PORT/x" 2>&1)
  echo "$2 $(awk '/Requests\/sec/ {print $2}' <<<"$out") p50=$(awk '$1=="50%" {print $2}' <<<"$out") p99=$(awk '$1=="99%" {print $2}' <<<"$out")"
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
}
for _ in $(seq "$ROUNDS"); do
  run "$OLD" old "${OLD_LOG:-info}" "$TMP/old.toml"
  run "$NEW" new info "$TMP/new.toml"
  run "$NEW" new-access-log-off "info,vmproxy::access=off" "$TMP/new.toml"
done
