#!/usr/bin/env bash
# CPU per call of the server process and of its lane processes at 64 closed-loop clients, from /proc over a
# 12 s window in the middle of a `translator-bench load` run, then a 6 s py-spy profile of the server process
# (folded stacks in $OUT/server.folded). Run from the repository root on an otherwise idle machine.
set -euo pipefail
OUT=${OUT:-/tmp/server-cpu}
PYSPY=${PYSPY:-py-spy}
mkdir -p "$OUT"
.venv/bin/translator-serve --host 127.0.0.1 --port 18101 --http-port 18100 --metrics-port 18102 \
    --max-batch-size 64 > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 90); do grep -q ready "$OUT/serve.log" && break; sleep 1; done
LANES=$(pgrep -P $SERVER | tr '\n' ' ')
ticks() { for p in "$@"; do awk '{print $14+$15}' "/proc/$p/stat"; done | paste -sd+ | bc; }
calls() {
    curl -s localhost:18102/metrics |
        awk '/^translator_requests_total/ && /method="Translate"/ && /code="OK"/ {s+=$2} END {print s+0}'
}
.venv/bin/translator-bench load --server 127.0.0.1:18101 --concurrency 64 --duration 28 --warmup 3 \
    > "$OUT/load.log" 2>&1 &
LOAD=$!
sleep 6
s0=$(ticks $SERVER); l0=$(ticks $LANES); c0=$(calls); t0=$(date +%s.%N)
sleep 12
s1=$(ticks $SERVER); l1=$(ticks $LANES); c1=$(calls); t1=$(date +%s.%N)
"$PYSPY" record -p $SERVER -d 6 -r 100 -f raw -o "$OUT/server.folded" --nonblocking > /dev/null 2>&1 || true
wait $LOAD
hz=$(getconf CLK_TCK)
python3 -c "
calls = $c1 - $c0; seconds = $t1 - $t0
print(f'{calls:.0f} calls in {seconds:.1f} s = {calls / seconds:.0f}/s; CPU per call: '
      f'server process {($s1 - $s0) / $hz / calls * 1000:.3f} ms, lane processes {($l1 - $l0) / $hz / calls * 1000:.3f} ms')
"
tail -3 "$OUT/load.log"
