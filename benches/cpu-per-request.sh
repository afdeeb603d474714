#!/usr/bin/env bash
# CPU time each proxy spends per request on the warm path (perf stat task-clock on the proxy's
# own processes while wrk drives it), one configuration after the other, on 127.0.0.1:
#   benches/cpu-per-request.sh [small|big] [conns] [seconds]
# Needs perf, wrk, nginx, and the harness built by benches/run.sh (or cargo bench --no-run).
set -euo pipefail
cd "$(dirname "$0")/.."
BODY=${1:-small}; CONNS=${2:-32}; SECS=${3:-5}
E2E=$(cargo bench --no-run --bench e2e --message-format=json 2>/dev/null | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "e2e" and m.get("executable"):
        print(m["executable"])')
TMP=$(mktemp -d /tmp/vmproxy-cpu.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
wait_file() { for _ in $(seq 1 500); do [[ -s $1 ]] && { cat "$1"; return 0; }; sleep 0.02; done; return 1; }

"$E2E" backend --addr-file "$TMP/b" & PIDS+=($!)
B=$(wait_file "$TMP/b")
"$E2E" front-vmproxy --backend "$B" --addr-file "$TMP/v" & VP=$!; PIDS+=($VP)
"$E2E" front-arp --backend "$B" --addr-file "$TMP/a" & AP=$!; PIDS+=($AP)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$TMP/n"
cat >"$TMP/n/nginx.conf" <<EOF
worker_processes $(nproc); daemon off; user root; pid $TMP/n/pid; error_log $TMP/n/err warn;
events { worker_connections 4096; }
http { access_log off; proxy_temp_path $TMP/n/p; client_body_temp_path $TMP/n/c;
  fastcgi_temp_path $TMP/n/f; uwsgi_temp_path $TMP/n/u; scgi_temp_path $TMP/n/s;
  upstream backend { server $B; keepalive 512; }
  server { listen 127.0.0.1:$PORT; location /app/ { proxy_pass http://backend;
    proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffers 16 64k;
    proxy_buffer_size 64k; proxy_max_temp_file_size 0; } } }
EOF
nginx -p "$TMP/n" -c "$TMP/n/nginx.conf" -e "$TMP/n/err" & NP=$!; PIDS+=($NP)
V=$(wait_file "$TMP/v"); A=$(wait_file "$TMP/a"); sleep 0.3
NW=$(pgrep -P "$NP" | paste -sd, -)
for cfg in "vmproxy $V $VP" "arp $A $AP" "nginx 127.0.0.1:$PORT $NP,$NW" "direct $B ${PIDS[0]}"; do
  set -- $cfg
  wrk -t1 -c"$CONNS" -d1s "http://$2/app/$BODY" >/dev/null
  perf stat -x, -e task-clock -p "$3" -o "$TMP/stat" -- sleep "$SECS" &
  SP=$!
  reqs=$(wrk -t1 -c"$CONNS" -d"${SECS}s" "http://$2/app/$BODY" | awk '/requests in/ {print $1}')
  wait "$SP" || true
  ms=$(awk -F, '/task-clock/ {print $1}' "$TMP/stat")
  python3 -c "import sys; r=int(sys.argv[2]); ms=float(sys.argv[3]); print('%-8s %8d requests  %7.0f ms CPU  %6.2f us CPU per request' % (sys.argv[1], r, ms, ms*1000/r))" "$1" "$reqs" "$ms"
done
