#!/usr/bin/env bash
# A memory alarm blocks the dead-letter connection, not the consumer
# (docs/operations.md, "Resource alarms"), and a silent broker ends the session
# within its lease (docs/design.md, "Fencing"). Starts a separate RabbitMQ node of the
# installed package on spare ports, then, for a classic and a quorum updates queue:
#   - publishes valid updates and invalid ones (dead-lettered by imattr) while no
#     worker runs, raises a memory alarm (set_vm_memory_high_watermark), starts
#     `imattr run` against the simulator;
#   - checks, during the alarm, that every valid update is applied and acknowledged
#     (the broker holds only the invalid ones unacknowledged) while the dead-letter
#     connection is blocked and the dead-letter queue stays empty;
#   - clears the alarm and checks that every invalid message reaches the dead-letter
#     queue, nothing is left in the updates queue, and the worker stops cleanly.
# Then, with a worker paused by the API (90009), freezes the node (SIGSTOP: to the
# worker, a connection that went silent) and checks that it says "not connected" and
# sends nothing more within amqp.lease_ms, and recovers once the node answers again.
# It stops only the node it started (never the broker on 5672). Needs root (the
# node runs as user rabbitmq). Usage: scripts/alarm-test.sh (KEEP=1 keeps its
# temporary directory, with logs).
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "alarm-test: run as root (the node runs as user rabbitmq)" >&2; exit 1; }
command -v rabbitmq-server >/dev/null || { echo "alarm-test: rabbitmq-server is not installed" >&2; exit 1; }

cargo build --locked --quiet
BIN=$PWD/target/debug/imattr

SUFFIX=$$-$RANDOM
NODE="imattr-alarm-$SUFFIX@localhost"
WORK=$(mktemp -d /tmp/imattr-alarm.XXXXXX)
chmod 755 "$WORK"
RMQ_HOME=$(getent passwd rabbitmq | cut -d: -f6)
PIDS=()
NODE_STARTED=0
FAILED=0
VALID=200
INVALID=20

as_rabbitmq() {
  runuser -u rabbitmq -- env HOME="$RMQ_HOME" \
    RABBITMQ_NODENAME="$NODE" RABBITMQ_NODE_PORT="$AMQP_PORT" RABBITMQ_DIST_PORT="$DIST_PORT" \
    RABBITMQ_CONFIG_FILE="$WORK/rabbitmq.conf" RABBITMQ_ADVANCED_CONFIG_FILE="$WORK/advanced.config" \
    RABBITMQ_CONF_ENV_FILE="$WORK/rabbitmq-env.conf" RABBITMQ_MNESIA_BASE="$WORK/mnesia" \
    RABBITMQ_LOG_BASE="$WORK/log" RABBITMQ_PID_FILE="$WORK/rabbit.pid" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$WORK/enabled_plugins" ERL_EPMD_ADDRESS=127.0.0.1 \
    "$@"
}
ctl() { as_rabbitmq timeout 60 /usr/lib/rabbitmq/bin/rabbitmqctl -n "$NODE" "$@"; }

cleanup() {
  local rc=$?
  set +e
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
  if [ "$NODE_STARTED" = 1 ]; then
    # A node left frozen by a failed step must be able to stop.
    [ -n "${NODE_PID:-}" ] && kill -CONT "$NODE_PID" 2>/dev/null
    ctl stop >/dev/null 2>&1 || {
      [ -s "$WORK/rabbit.pid" ] && kill "$(cat "$WORK/rabbit.pid")" 2>/dev/null
    }
  fi
  if [ "$rc" != 0 ] || [ "$FAILED" != 0 ]; then
    echo "alarm-test: FAILED; worker and node logs:" >&2
    tail -n 20 "$WORK"/run-*.log 2>/dev/null >&2
    tail -n 20 "$WORK"/log/*.log 2>/dev/null >&2
  fi
  if [ -n "${KEEP:-}" ]; then echo "alarm-test: kept $WORK" >&2; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
spare_port() {
  local p
  for _ in $(seq 1 100); do
    # 20000-29999: below the ephemeral range and the CLI's distribution ports.
    p=$((20000 + RANDOM % 10000))
    if port_free "$p" && ! grep -qw "$p" <<<"$TAKEN"; then echo "$p"; return; fi
  done
  echo "alarm-test: no spare port" >&2; return 1
}
TAKEN=""
AMQP_PORT=$(spare_port); TAKEN="$TAKEN $AMQP_PORT"
DIST_PORT=$(spare_port); TAKEN="$TAKEN $DIST_PORT"
SIM_PORT=$(spare_port); TAKEN="$TAKEN $SIM_PORT"

# --- The node ---------------------------------------------------------------
mkdir -p "$WORK/mnesia" "$WORK/log"
chown rabbitmq: "$WORK/mnesia" "$WORK/log"
echo '[].' >"$WORK/enabled_plugins"
echo '[].' >"$WORK/advanced.config"
: >"$WORK/rabbitmq-env.conf"
echo "listeners.tcp.1 = 127.0.0.1:$AMQP_PORT" >"$WORK/rabbitmq.conf"
chmod 644 "$WORK/rabbitmq.conf" "$WORK/enabled_plugins" "$WORK/advanced.config" "$WORK/rabbitmq-env.conf"
echo "alarm-test: starting node $NODE (AMQP $AMQP_PORT, dist $DIST_PORT)"
NODE_STARTED=1
(cd "$RMQ_HOME" && as_rabbitmq /usr/lib/rabbitmq/bin/rabbitmq-server -detached) >/dev/null
t0=$SECONDS
until ctl await_startup --timeout 20 >/dev/null 2>&1; do
  if [ $((SECONDS - t0)) -gt 90 ]; then echo "alarm-test: node did not start in 90 s" >&2; exit 1; fi
  sleep 1
done
echo "alarm-test: node up in $((SECONDS - t0)) s"
# The node's Erlang VM, to freeze it later.
NODE_PID=$(ctl eval 'os:getpid().' | tr -dc 0-9)
[ -n "$NODE_PID" ] || { echo "alarm-test: cannot find the node's pid" >&2; exit 1; }

"$BIN" simulate --listen "127.0.0.1:$SIM_PORT" --attr-names n >"$WORK/sim.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do port_free "$SIM_PORT" || break; sleep 0.1; done

pass() { echo "ok   $1"; }
fail() { echo "FAIL $1" >&2; FAILED=1; }

# waits up to $1 seconds for the command after it to succeed
wait_for() {
  local secs=$1; shift
  local t=$SECONDS
  until "$@"; do
    [ $((SECONDS - t)) -lt "$secs" ] || return 1
    sleep 0.5
  done
}
# "ready unacked" of queue $1
queue_counts() { ctl -q list_queues --no-table-headers name messages_ready messages_unacknowledged |
  awk -v q="$1" '$1 == q { print $2, $3 }'; }
counts_are() { [ "$(queue_counts "$1")" = "$2" ]; }
# the state (running, blocked, blocking, …) of the connections named like $1
conn_state() { ctl -q list_connections --no-table-headers state client_properties |
  grep -F "$1" | awk '{ print $1 }' | sort -u | tr '\n' ' '; }
alarm_on() { ! as_rabbitmq timeout 60 /usr/lib/rabbitmq/bin/rabbitmq-diagnostics -n "$NODE" -q check_local_alarms >/dev/null 2>&1; }
alarm_off() { ! alarm_on; }
applied_all() {
  local got
  got=$(curl -fsS "http://127.0.0.1:$SIM_PORT/__simulator/state" 2>/dev/null) || return 1
  [ "$(grep -o '"acc[0-9]*":{"n":"[0-9]*"}' <<<"$got" | wc -l)" = "$VALID" ]
}

run_case() { # queue type
  local type=$1 Q="imattr.alarm.$1.$SUFFIX"
  local env=(
    IMATTR_CONFIG=/dev/null IMATTR_AMQP__URL="amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f"
    IMATTR_AMQP__EXCHANGE="$Q" IMATTR_AMQP__QUEUE="$Q" IMATTR_AMQP__QUEUE_TYPE="$type"
    IMATTR_AMQP__DEAD_LETTER_EXCHANGE="$Q.dead" IMATTR_AMQP__DEAD_LETTER_QUEUE="$Q.dead"
    IMATTR_TENCENT__BASE_URL="http://127.0.0.1:$SIM_PORT" IMATTR_TENCENT__SDKAPPID=1400000000
    IMATTR_TENCENT__SECRET_KEY=5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e
    IMATTR_ATTRIBUTES__ALLOWED='[n]' IMATTR_ADMIN__LISTEN= IMATTR_BATCH__MAX_WAIT_MS=20
  )
  echo "alarm-test: $type queue $Q"
  # Valid updates and invalid ones (an attribute the app does not have), interleaved;
  # publish declares the topology. No worker runs yet.
  for i in $(seq 1 "$VALID"); do
    echo "{\"To_Account\":\"acc$i\",\"Attrs\":{\"n\":\"$i\"}}"
    [ $((i % (VALID / INVALID))) = 0 ] && echo "{\"To_Account\":\"bad$i\",\"Attrs\":{\"nope\":\"x\"}}"
  done >"$WORK/updates-$type.ndjson"
  env "${env[@]}" timeout 60 "$BIN" declare >/dev/null
  # The publisher knows an attribute the worker does not: those are valid to
  # publish and refused (dead-lettered) by the worker.
  env "${env[@]}" IMATTR_ATTRIBUTES__ALLOWED='[n,nope]' timeout 60 "$BIN" publish \
    --file "$WORK/updates-$type.ndjson" >/dev/null
  # (A quorum queue's counts are updated every few seconds.)
  wait_for 30 counts_are "$Q" "$((VALID + INVALID)) 0" ||
    { fail "$type: published $(queue_counts "$Q")"; return; }

  ctl set_vm_memory_high_watermark 0.0000001 >/dev/null
  wait_for 30 alarm_on || { fail "$type: no memory alarm"; return; }
  pass "$type: memory alarm raised"
  env "${env[@]}" "$BIN" run >"$WORK/run-$type.log" 2>&1 &
  local run_pid=$!
  PIDS+=("$run_pid")
  if wait_for 60 applied_all; then pass "$type: every valid update applied during the alarm"; else fail "$type: not applied during the alarm"; fi
  # Acks go through: the broker holds only the invalid messages, unacknowledged.
  if wait_for 30 counts_are "$Q" "0 $INVALID"; then
    pass "$type: acks went through during the alarm ($(queue_counts "$Q") ready/unacked)"
  else
    fail "$type: acks did not go through during the alarm: ready/unacked $(queue_counts "$Q")"
  fi
  local dl_state run_state
  dl_state=$(conn_state "imattr dead letters $Q")
  run_state=$(conn_state "imattr run $Q")
  # During an alarm every connection is "blocking" (blocked once it publishes);
  # the publishing one is "blocked".
  if [ "$dl_state" = "blocked " ] && [ "$run_state" != "blocked " ]; then
    pass "$type: the dead-letter connection is $dl_state, the consume connection $run_state"
  else
    fail "$type: dead-letter connection '$dl_state', consume connection '$run_state'"
  fi
  [ "$(queue_counts "$Q.dead")" = "0 0" ] && pass "$type: no dead letter while blocked" ||
    fail "$type: dead-letter queue during the alarm: $(queue_counts "$Q.dead")"

  ctl set_vm_memory_high_watermark 0.4 >/dev/null
  wait_for 30 alarm_off || { fail "$type: the alarm did not clear"; return; }
  if wait_for 60 counts_are "$Q.dead" "$INVALID 0"; then
    pass "$type: after the alarm, $INVALID dead letters"
  else
    fail "$type: dead-letter queue after the alarm: $(queue_counts "$Q.dead")"
  fi
  if wait_for 30 counts_are "$Q" "0 0"; then pass "$type: nothing left in the updates queue"; else fail "$type: left: $(queue_counts "$Q")"; fi
  kill -TERM "$run_pid"
  timeout 40 tail --pid="$run_pid" -f /dev/null || kill -KILL "$run_pid"
  local rc=0
  wait "$run_pid" || rc=$?
  [ "$rc" = 0 ] && pass "$type: run stopped cleanly" || fail "$type: run exit status $rc"
  ctl delete_queue "$Q" >/dev/null; ctl delete_queue "$Q.dead" >/dev/null
}

# --- A frozen broker: the lease ---------------------------------------------
# The node stops answering (SIGSTOP: a half-open connection, as far as the worker
# can tell) while the worker is paused by the API (90009) and probing it: within
# amqp.lease_ms it must stop sending and say "not connected", and once the node
# answers again it reconnects and applies the update.
set_faults() { # misconfigured true|false
  local f
  f=$(curl -fsS "http://127.0.0.1:$SIM_PORT/__simulator/faults") &&
    f=$(sed -E "s/\"misconfigured\":(true|false)/\"misconfigured\":$1/" <<<"$f") &&
    curl -fsS -X POST -H 'content-type: application/json' -d "$f" "http://127.0.0.1:$SIM_PORT/__simulator/faults"
}
set_attr_requests() {
  curl -fsS "http://127.0.0.1:$SIM_PORT/__simulator/stats" | grep -o '"im_set_attr":{[^}]*}' |
    grep -o ':[0-9]*' | tr -d : | awk '{ n += $1 } END { print n + 0 }'
}
ready_says() { curl -s "http://127.0.0.1:$ADMIN_PORT/readyz" | grep -q "$1"; }
now_ms() { date +%s%3N; }
freeze_case() {
  local Q="imattr.alarm.frozen.$SUFFIX"
  ADMIN_PORT=$(spare_port); TAKEN="$TAKEN $ADMIN_PORT"
  local env=(
    IMATTR_CONFIG=/dev/null IMATTR_AMQP__URL="amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f"
    IMATTR_AMQP__EXCHANGE="$Q" IMATTR_AMQP__QUEUE="$Q"
    IMATTR_AMQP__DEAD_LETTER_EXCHANGE="$Q.dead" IMATTR_AMQP__DEAD_LETTER_QUEUE="$Q.dead"
    IMATTR_AMQP__LEASE_MS=2000
    IMATTR_TENCENT__BASE_URL="http://127.0.0.1:$SIM_PORT" IMATTR_TENCENT__SDKAPPID=1400000000
    IMATTR_TENCENT__SECRET_KEY=5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e
    IMATTR_ATTRIBUTES__ALLOWED='[n]' IMATTR_ADMIN__LISTEN="127.0.0.1:$ADMIN_PORT" IMATTR_BATCH__MAX_WAIT_MS=20
  )
  echo "alarm-test: frozen broker, queue $Q"
  env "${env[@]}" "$BIN" run >"$WORK/run-frozen.log" 2>&1 &
  local run_pid=$!
  PIDS+=("$run_pid")
  wait_for 60 ready_says '^ready' || { fail "frozen: the worker did not get ready"; return; }
  set_faults true >/dev/null
  echo '{"To_Account":"frozen","Attrs":{"n":"1"}}' |
    env "${env[@]}" timeout 60 "$BIN" publish --file - >/dev/null
  wait_for 60 ready_says paused || { fail "frozen: the worker did not pause"; return; }
  local beam=$NODE_PID t0 t1
  t0=$(now_ms)
  kill -STOP "$beam"
  if wait_for 30 ready_says "not connected"; then
    t1=$(now_ms)
    pass "frozen: /readyz said not connected $((t1 - t0)) ms after the node froze (amqp.lease_ms = 2000)"
  else
    kill -CONT "$beam"; fail "frozen: still $(curl -s "http://127.0.0.1:$ADMIN_PORT/readyz") 30 s after the node froze"; return
  fi
  # Nothing of the lost session leaves any more: no probe while the node is frozen.
  sleep 1
  local sent
  sent=$(set_attr_requests)
  sleep 8
  if [ "$(set_attr_requests)" = "$sent" ]; then
    pass "frozen: no request sent after the lease ended ($sent in all)"
  else
    fail "frozen: requests went on after the lease ended: $sent, then $(set_attr_requests)"
  fi
  kill -CONT "$beam"
  set_faults false >/dev/null
  local applied=0
  for _ in $(seq 1 120); do
    curl -fsS "http://127.0.0.1:$SIM_PORT/__simulator/state" | grep -q '"frozen":{"n":"1"}' && { applied=1; break; }
    sleep 0.5
  done
  [ "$applied" = 1 ] && pass "frozen: reconnected and applied the update once the node answered" ||
    fail "frozen: the update was not applied after the node answered again"
  wait_for 60 counts_are "$Q" "0 0" || fail "frozen: left: $(queue_counts "$Q")"
  kill -TERM "$run_pid"
  timeout 40 tail --pid="$run_pid" -f /dev/null || kill -KILL "$run_pid"
  wait "$run_pid" || true
  ctl delete_queue "$Q" >/dev/null; ctl delete_queue "$Q.dead" >/dev/null
}

run_case classic
run_case quorum
freeze_case

[ "$FAILED" = 0 ] || exit 1
echo "alarm-test: all passed in ${SECONDS}s"
