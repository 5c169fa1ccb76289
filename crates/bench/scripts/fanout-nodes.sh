#!/bin/bash
# One fan-out run of docs/benchmarks.md "Redis backend (issue 3)": starts a fresh Redis (unless
# MODE=memory) and 1 or 3 fresh `switchyard` nodes on ports chosen at start, runs
# `switchyard-bench fanout` against all of them, records Redis `INFO commandstats stats` before,
# every 0.5 s during and 2 s after the run, then stops every process it started by its pid.
#
#   B=/work/target-bench/release crates/bench/scripts/fanout-nodes.sh MODE RATE OUTDIR
#
# MODE: memory (1 node, memory backend) | redis1 (1 node on Redis) | redis3 (3 nodes on one Redis).
# RATE: publications per second per publisher, or `max`. PUBS: publishers (default 10).
# OUTDIR receives report.json (the bench's --json line), bench.err (timestamped), commands.txt,
# info_before.txt / info_after.txt / poll.txt (Redis), node logs, /proc/stat and loadavg snapshots.
set -u
MODE=$1
RATE=$2
OUT=$3
B=${B:?set B to the directory of the release binaries}
mkdir -p "$OUT"
SPIDS=()
URLS=()
RPID=""
POLLPID=""
RP=""

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
stop_pid() { # SIGTERM, wait up to 20 s, then SIGKILL
  local p=$1
  kill -TERM "$p" 2>/dev/null
  for _ in $(seq 200); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
  echo "pid $p did not stop; SIGKILL" >&2
  kill -KILL "$p" 2>/dev/null
}
cleanup() {
  [ -n "$POLLPID" ] && { kill "$POLLPID" 2>/dev/null; wait "$POLLPID" 2>/dev/null; }
  for p in "${SPIDS[@]}"; do stop_pid "$p"; done
  [ -n "$RPID" ] && stop_pid "$RPID"
  wait 2>/dev/null
}
trap cleanup EXIT

case $MODE in
  memory | redis1) NODES=1 ;;
  redis3) NODES=3 ;;
  *) echo "MODE must be memory, redis1 or redis3" >&2; exit 2 ;;
esac
ENVS=()
if [ "$MODE" != memory ]; then
  RP=$(free_port)
  redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no --dir "$OUT" > "$OUT/redis.log" 2>&1 &
  RPID=$!
  for _ in $(seq 100); do redis-cli -p "$RP" PING > /dev/null 2>&1 && break; sleep 0.1; done
  echo "redis-server --port $RP --bind 127.0.0.1 --save \"\" --appendonly no   # pid $RPID" > "$OUT/commands.txt"
  ENVS=(SWITCHYARD_BACKEND=redis "SWITCHYARD_REDIS_URL=redis://127.0.0.1:$RP/")
fi
for i in $(seq "$NODES"); do
  env "${ENVS[@]}" "$B/switchyard" --listen 127.0.0.1:0 > "$OUT/node$i.out" 2> "$OUT/node$i.err" &
  SPIDS+=($!)
  for _ in $(seq 200); do [ -s "$OUT/node$i.out" ] && break; sleep 0.05; done
  PORT=$(head -1 "$OUT/node$i.out" | sed -n 's#.*http://127.0.0.1:\([0-9]*\).*#\1#p')
  [ -z "$PORT" ] && { echo "node $i did not start: $(cat "$OUT/node$i.err")" >&2; exit 1; }
  URLS+=(--url "http://127.0.0.1:$PORT")
  echo "${ENVS[*]} switchyard --listen 127.0.0.1:0   # port $PORT, pid ${SPIDS[-1]}" >> "$OUT/commands.txt"
done
PIDARGS=()
for p in "${SPIDS[@]}"; do PIDARGS+=(--server-pid "$p"); done
[ -n "$RPID" ] && PIDARGS+=(--server-pid "$RPID") # last: Redis's own CPU in the report's `servers`
if [ -n "$RPID" ]; then
  redis-cli -p "$RP" INFO commandstats stats > "$OUT/info_before.txt"
  (while true; do
    echo "T $(date +%s.%N)"
    redis-cli -p "$RP" INFO commandstats stats
    sleep 0.5
  done) > "$OUT/poll.txt" 2> /dev/null &
  POLLPID=$!
fi
BENCH=(fanout --subscribers 1000 --rooms 10 --publishers "${PUBS:-10}" --rate "$RATE" --window 16
  --payload 100 --duration 10 "${URLS[@]}" "${PIDARGS[@]}")
echo "switchyard-bench --json ${BENCH[*]}" >> "$OUT/commands.txt"
date -u > "$OUT/date.txt"
cat /proc/loadavg > "$OUT/loadavg_before.txt"
head -1 /proc/stat > "$OUT/stat_before.txt"
"$B/switchyard-bench" --json "${BENCH[@]}" > "$OUT/report.json" \
  2> >(while IFS= read -r line; do echo "$(date +%s.%N) $line"; done > "$OUT/bench.err")
echo "bench exit $?" >> "$OUT/commands.txt"
head -1 /proc/stat > "$OUT/stat_after.txt"
cat /proc/loadavg > "$OUT/loadavg_after.txt"
if [ -n "$RPID" ]; then
  sleep 2 # let the nodes finish the closes (presence, session status) before the last reading
  kill "$POLLPID"
  wait "$POLLPID" 2> /dev/null
  POLLPID=""
  redis-cli -p "$RP" INFO commandstats stats > "$OUT/info_after.txt"
fi
