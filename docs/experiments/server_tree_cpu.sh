#!/usr/bin/env bash
# CPU per call of any translator.v1 server process and its children (our lane processes, CTranslate2's
# threads are inside its one process) at 64 closed-loop clients of `translator-bench load`, over a 10 s window
# of a 16 s run. The server must listen on 127.0.0.1:18101 and print "ready" when it can take calls.
#
#   docs/experiments/server_tree_cpu.sh ours -- .venv/bin/translator-serve --host 127.0.0.1 --port 18101 \
#       --http-port 18100 --metrics-port 18102 --max-batch-size 64 --max-queue-delay-ms 5 [--precision int8]
#   docs/experiments/server_tree_cpu.sh ct2 -- .venv/bin/python -m bench.ctranslate2_server --port 18101 \
#       [--compute-type int8]
#   docs/experiments/server_tree_cpu.sh floor -- .venv/bin/python docs/experiments/grpc_floor.py
set -euo pipefail
NAME=$1
shift 2
OUT=${OUT:-/tmp/server-tree-cpu}/$NAME
mkdir -p "$OUT"
"$@" > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; sleep 1' EXIT
for _ in $(seq 1 120); do grep -q ready "$OUT/serve.log" && break; sleep 1; done
tree() { echo $SERVER; pgrep -P $SERVER || true; }
ticks() { for p in $(tree); do awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || true; done | paste -sd+ | bc; }
.venv/bin/translator-bench load --server 127.0.0.1:18101 --concurrency 64 --duration 16 --warmup 3 \
    --json "$OUT/load.json" > "$OUT/load.log" 2>&1 &
LOAD=$!
sleep 4
s0=$(ticks); t0=$(date +%s.%N)
sleep 10
s1=$(ticks); t1=$(date +%s.%N)
wait $LOAD
python3 - "$OUT/load.json" "$s0" "$s1" "$t0" "$t1" "$(getconf CLK_TCK)" "$NAME" <<'PY'
import json, sys
path, s0, s1, t0, t1, hz, name = sys.argv[1:]
rps = json.load(open(path))["settings"][0]["points"][0]["requests_per_s"]
cores = (float(s1) - float(s0)) / float(hz) / (float(t1) - float(t0))
print(f"{name}: {rps:.0f} req/s, server tree {cores:.2f} cores, {cores / rps * 1000:.3f} ms CPU per call")
PY
