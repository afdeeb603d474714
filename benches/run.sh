#!/usr/bin/env bash
# Runs every benchmark of vmproxy on this machine, on 127.0.0.1 only, and writes the results
# under benches/results/ (CSV, JSON, Markdown tables, plot.png); the plot is also copied to
# benches/plot.png. See BENCHMARKS.md.
#
#   benches/run.sh            # the full run (~25 min on 2 cores)
#   QUICK=1 benches/run.sh    # a smoke pass: 1 run per point, 2 s loads, fewer machines
#
# Knobs (environment): RUNS (5), DURATION (5s), CONNS ("1 32 256"), BODIES ("small big"),
# CONFIGS ("direct binary nginx binary-log nginx-log vmproxy arp": the `vmproxy` binary and
# nginx without and with an access log, the layer in an axum server, axum-reverse-proxy), COLD_N (10000), COLD_BOOT_MS (5000), COLD_RUNS (3),
# READY_MACHINES (20), READY_RUNS (3), SKIP_CRITERION (0), SKIP_WARM (0), SKIP_COLD (0).
#
# It installs what is missing: nginx and wrk from Debian's packages (apt-get), matplotlib with
# pip. Every process it starts is stopped when it ends, also on error or Ctrl-C.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
RESULTS=$ROOT/benches/results
mkdir -p "$RESULTS"

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
  RUNS=${RUNS:-1}; DURATION=${DURATION:-2s}; COLD_RUNS=${COLD_RUNS:-1}
  READY_MACHINES=${READY_MACHINES:-8}; READY_RUNS=${READY_RUNS:-1}; CRITERION_ARGS=(--quick)
else
  RUNS=${RUNS:-5}; DURATION=${DURATION:-5s}; COLD_RUNS=${COLD_RUNS:-3}
  READY_MACHINES=${READY_MACHINES:-20}; READY_RUNS=${READY_RUNS:-3}; CRITERION_ARGS=()
fi
CONNS=${CONNS:-"1 32 256"}
BODIES=${BODIES:-"small big"}
CONFIGS=${CONFIGS:-"direct binary nginx binary-log nginx-log vmproxy arp"}
COLD_N=${COLD_N:-10000}
COLD_BOOT_MS=${COLD_BOOT_MS:-5000}

TMP=$(mktemp -d /tmp/vmproxy-bench.XXXXXX)
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT TERM

log() { printf '\n== %s\n' "$*" >&2; }

# ---------------------------------------------------------------------------------------------
log "tools"
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
command -v curl >/dev/null || missing+=(curl)
if ((${#missing[@]})); then
  echo "installing from Debian's packages: ${missing[*]}" >&2
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if ! python3 -c 'import matplotlib' 2>/dev/null; then
  echo "installing matplotlib with pip" >&2
  python3 -m pip install -q matplotlib || python3 -m pip install -q --break-system-packages matplotlib
fi
# 10,000 concurrent connections need more than the usual 1024 descriptors (both ends).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "nproc: $(nproc)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  echo "memory: $(free -h | awk '/^Mem:/ {print $2}')"
  echo "kernel: $(uname -r)"
  echo "rustc: $(rustc --version)"
  echo "nginx: $($NGINX -v 2>&1 | sed 's/.*: //')"
  echo "wrk: $(wrk -v 2>&1 | head -1 | awk '{print $2}')"
  echo "somaxconn: $(cat /proc/sys/net/core/somaxconn)"
  echo "quick: $QUICK runs: $RUNS duration: $DURATION"
} | tee "$RESULTS/machine.txt" >&2

# ---------------------------------------------------------------------------------------------
log "build (release)"
FEATURES=()
if grep -q 'pub struct Emulator\b' src/emulator/mod.rs 2>/dev/null; then
  FEATURES=(--features emulator)
fi
E2E=$(cargo bench --no-run --bench e2e "${FEATURES[@]}" --message-format=json 2>"$TMP/build.log" |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "e2e" and m.get("executable"):
        print(m["executable"])') || { cat "$TMP/build.log" >&2; exit 1; }
[[ -x $E2E ]] || { cat "$TMP/build.log" >&2; echo "no e2e binary" >&2; exit 1; }
echo "harness: $E2E" >&2
cargo build --release --bin vmproxy 2>"$TMP/build-bin.log" || { cat "$TMP/build-bin.log" >&2; exit 1; }
BIN=$ROOT/target/release/vmproxy
echo "binary: $BIN" >&2

wait_file() {
  local i
  for i in $(seq 1 500); do
    [[ -s $1 ]] && { cat "$1"; return 0; }
    sleep 0.02
  done
  echo "timed out waiting for $1" >&2
  return 1
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ---------------------------------------------------------------------------------------------
if [[ ${SKIP_CRITERION:-0} != 1 ]]; then
  log "criterion micro-benchmarks (cargo bench --bench overhead)"
  cargo bench --bench overhead -- "${CRITERION_ARGS[@]}" 2>&1 | tee "$RESULTS/criterion.txt" >&2
fi

# ---------------------------------------------------------------------------------------------
if [[ ${SKIP_WARM:-0} != 1 ]]; then
  log "warm path: start the backend and the fronts"
  "$E2E" backend --addr-file "$TMP/backend.addr" &
  PIDS+=($!)
  BACKEND=$(wait_file "$TMP/backend.addr")
  "$E2E" front-vmproxy --backend "$BACKEND" --addr-file "$TMP/vmproxy.addr" &
  PIDS+=($!)
  "$E2E" front-arp --backend "$BACKEND" --addr-file "$TMP/arp.addr" &
  PIDS+=($!)
  # The binary as a user runs it: its machine is a process, this same backend server on a port
  # of its own (the identical code as the shared backend the others use), started on the first
  # request and never stopped while the runs last. `binary` logs warnings only; `binary-log`
  # writes its access log (the default) to a file, as nginx-log does.
  BIN_PORT=$(free_port)
  cat >"$TMP/vmproxy.toml" <<EOF
listen = "127.0.0.1:$BIN_PORT"
[[route]]
name = "bench"
path = "/app"
health_path = "/app/health"
idle_timeout = "0s"
[route.process]
command = ["$E2E", "backend", "--port", "{port}", "--addr-file", "$TMP/bin-backend.addr"]
EOF
  if [[ " $CONFIGS " == *" binary "* ]]; then
    RUST_LOG=warn "$BIN" --config "$TMP/vmproxy.toml" 2>"$TMP/vmproxy-bin.log" &
    PIDS+=($!)
  fi
  BINLOG_PORT=$(free_port)
  sed -e "s/127.0.0.1:$BIN_PORT/127.0.0.1:$BINLOG_PORT/" -e "s/bin-backend.addr/bin-log-backend.addr/" \
    "$TMP/vmproxy.toml" >"$TMP/vmproxy-log.toml"
  if [[ " $CONFIGS " == *" binary-log "* ]]; then
    "$BIN" --config "$TMP/vmproxy-log.toml" 2>"$TMP/vmproxy-access.log" &
    PIDS+=($!)
  fi
  mkdir -p "$TMP/nginx/logs"
  NGINX_PORT=$(free_port)
  NGINX_LOG_PORT=$(free_port)
  cat >"$TMP/nginx/nginx.conf" <<EOF
# worker_processes matches the tokio fronts' worker threads (one per core).
worker_processes $(nproc);
daemon off;
master_process on;
user root;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/logs/error.log warn;
events { worker_connections 4096; }
http {
  client_body_temp_path $TMP/nginx/client_body;
  proxy_temp_path $TMP/nginx/proxy;
  fastcgi_temp_path $TMP/nginx/fastcgi;
  uwsgi_temp_path $TMP/nginx/uwsgi;
  scgi_temp_path $TMP/nginx/scgi;
  keepalive_requests 1000000;
  upstream backend {
    server $BACKEND;
    keepalive 512;
    keepalive_requests 1000000;
  }
  # nginx-log: nginx's default access log (the combined format) on the second port.
  map \$server_port \$logged {
    $NGINX_LOG_PORT 1;
    default 0;
  }
  access_log $TMP/nginx/logs/access.log combined if=\$logged;
  server {
    listen 127.0.0.1:$NGINX_PORT;
    listen 127.0.0.1:$NGINX_LOG_PORT;
    location /app/ {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      # Buffer in memory, never spill a 1 MiB body to a temp file.
      proxy_buffers 16 64k;
      proxy_buffer_size 64k;
      proxy_max_temp_file_size 0;
    }
  }
}
EOF
  "$NGINX" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -e "$TMP/nginx/logs/error.log" &
  PIDS+=($!)
  declare -A URL
  URL[direct]="http://$BACKEND"
  URL[vmproxy]="http://$(wait_file "$TMP/vmproxy.addr")"
  URL[arp]="http://$(wait_file "$TMP/arp.addr")"
  URL[nginx]="http://127.0.0.1:$NGINX_PORT"
  URL[nginx-log]="http://127.0.0.1:$NGINX_LOG_PORT"
  URL[binary]="http://127.0.0.1:$BIN_PORT"
  URL[binary-log]="http://127.0.0.1:$BINLOG_PORT"
  for cfg in $CONFIGS; do
    for i in $(seq 1 100); do
      curl -fsS -o /dev/null "${URL[$cfg]}/app/small" 2>/dev/null && break
      sleep 0.05
    done
    small=$(curl -fsS "${URL[$cfg]}/app/small" | wc -c)
    big=$(curl -fsS "${URL[$cfg]}/app/big" | wc -c)
    echo "$cfg: ${URL[$cfg]} small=$small B big=$big B" >&2
    [[ $small == 13 && $big == 1048576 ]] || { echo "$cfg answers wrong sizes" >&2; exit 1; }
    # Warm each front's pool.
    wrk -t1 -c256 -d1s "${URL[$cfg]}/app/small" >/dev/null
  done

  log "warm path: $RUNS runs x bodies [$BODIES] x conns [$CONNS] x configs [$CONFIGS], $DURATION each"
  WARM=$RESULTS/warm.jsonl
  : >"$WARM"
  read -r -a CFG_LIST <<<"$CONFIGS"
  for run in $(seq 1 "$RUNS"); do
    for body in $BODIES; do
      for c in $CONNS; do
        # Rotate the order of the configurations from run to run: none always goes first.
        n=${#CFG_LIST[@]}
        for k in $(seq 0 $((n - 1))); do
          cfg=${CFG_LIST[$(((k + run) % n))]}
          out=$(wrk -t1 -c"$c" -d"$DURATION" --timeout 10s -s benches/wrk-json.lua "${URL[$cfg]}/app/$body" | grep '^RESULT ' | cut -d' ' -f2-)
          line="{\"config\":\"$cfg\",\"body\":\"$body\",\"conns\":$c,\"run\":$run,\"result\":$out}"
          echo "$line" >>"$WARM"
          python3 -c 'import json,sys; d=json.loads(sys.argv[1]); r=d["result"]
print("run %d %-5s c=%-3d %-8s %9.0f req/s  p50 %6d us  p99 %7d us  errors %d non2xx %d" % (d["run"], d["body"], d["conns"], d["config"], r["requests"]/(r["duration_us"]/1e6), r["p50_us"], r["p99_us"], r["errors"], r["non2xx"]))' "$line" >&2
        done
      done
    done
  done
  # Stop the warm-path processes before the cold-start runs need the CPU.
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
fi

# ---------------------------------------------------------------------------------------------
if [[ ${SKIP_COLD:-0} != 1 ]]; then
  log "cold start: $COLD_N concurrent first requests, boot ${COLD_BOOT_MS} ms, $COLD_RUNS runs"
  "$E2E" coldstart --n "$COLD_N" --boot-ms "$COLD_BOOT_MS" --runs "$COLD_RUNS" --out "$RESULTS/coldstart.json" &
  PIDS+=($!)
  wait "${PIDS[-1]}"
  unset 'PIDS[-1]'

  log "memory per parked request, in-process ($COLD_N parked, 3 processes)"
  : >"$RESULTS/parked_mem.jsonl"
  for i in 1 2 3; do
    "$E2E" parked-mem --n "$COLD_N" >>"$RESULTS/parked_mem.jsonl"
  done

  log "memory per parked connection, the binary (5000 parked HTTP/1.1 connections, 3 processes)"
  : >"$RESULTS/parked_bin.jsonl"
  for i in 1 2 3; do
    "$E2E" parked-bin --bin "$BIN" --n 5000 >>"$RESULTS/parked_bin.jsonl"
  done

  log "accept storm: 2000 clients connecting at once to a cold route (default backlog, then 128)"
  : >"$RESULTS/accept_storm.jsonl"
  for i in 1 2 3; do
    "$E2E" accept-storm --bin "$BIN" --n 2000 >>"$RESULTS/accept_storm.jsonl"
    "$E2E" accept-storm --bin "$BIN" --n 2000 --backlog 128 >>"$RESULTS/accept_storm.jsonl"
  done

  log "readiness lag: $READY_MACHINES machines, boot times 1-20 s, $READY_RUNS runs"
  "$E2E" readiness --machines "$READY_MACHINES" --runs "$READY_RUNS" --out "$RESULTS/readiness.json"

  log "control-plane calls per cold start (emulator)"
  if ((${#FEATURES[@]})); then
    rm -f "$RESULTS/controlplane.txt"
    "$E2E" controlplane --concurrent 100 --runs "$COLD_RUNS" --out "$RESULTS/controlplane.json" >/dev/null ||
      echo "controlplane failed" | tee "$RESULTS/controlplane.txt" >&2
  else
    echo "skipped: the Compute Engine emulator (feature 'emulator') is not implemented yet" | tee "$RESULTS/controlplane.txt" >&2
    rm -f "$RESULTS/controlplane.json"
  fi
fi

# ---------------------------------------------------------------------------------------------
log "report"
python3 benches/report.py "$RESULTS"
cp "$RESULTS/plot.png" benches/plot.png
echo "tables: $RESULTS/summary.md; plot: benches/plot.png" >&2
