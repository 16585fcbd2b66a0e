#!/usr/bin/env bash
# A RabbitMQ cluster that loses a node (docs/several-workers.md): starts three
# nodes of the installed RabbitMQ on spare local ports and joins them, runs
# the simulator (`imattr simulate`) and two workers (`imattr run`) with
# amqp.url listing all three nodes and a quorum queue: the active one, and a
# standby registered after it on another node. It publishes a stream of
# growing integer values, stops the active worker's node mid-stream, publishes
# the rest, and checks:
#   - mid-stream: the active worker holds unsettled messages when its node stops;
#   - exactly one worker is active before and after, and after the stop it is
#     the standby, next in registration order, which gets redeliveries; the
#     worker that lost its node is back as a standby;
#   - nothing lost: the API's final state is the last value published per account;
#   - no account in two requests at once, no value going backwards (simulator stats);
#   - nothing dead-lettered, nothing left in the queue;
#   - the dead-letter queue is a stream (replicated like the quorum updates
#     queue), and the worker declares its topology on a surviving node although
#     the stopped one hosted both queues (DLQ=classic: a classic dead-letter
#     queue from an earlier release on the stopped node instead, kept as it is).
# It stops only the nodes it started (never the broker on 5672), also on
# failure. Needs root (the nodes run as user rabbitmq).
# Installs jq if missing. Usage: scripts/cluster-test.sh (KEEP=1 keeps its temporary directory with
# the node and worker logs; MESSAGES=, ACCOUNTS= resize it).
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "cluster-test: run as root (the nodes run as user rabbitmq)" >&2; exit 1; }
command -v rabbitmq-server >/dev/null || { echo "cluster-test: rabbitmq-server is not installed" >&2; exit 1; }
if ! command -v jq >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq jq
fi
command -v jq >/dev/null || { echo "cluster-test: needs jq" >&2; exit 1; }

T0=$SECONDS
cargo build --locked --quiet
echo "cluster-test: built in $((SECONDS - T0)) s"
BIN=$PWD/target/debug/imattr

SUFFIX=$$-$RANDOM
WORK=$(mktemp -d /tmp/imattr-cluster.XXXXXX)
chmod 755 "$WORK"
RMQ_HOME=$(getent passwd rabbitmq | cut -d: -f6)
PIDS=()
STARTED=()
MESSAGES=${MESSAGES:-20000}
ACCOUNTS=${ACCOUNTS:-5000}

say() { echo "cluster-test: $*"; }
fail() { echo "cluster-test: FAILED: $*" >&2; exit 1; }
# The cluster itself could not be set up (a node did not start or join): nothing
# about imattr was tested. Exit 3 so a caller may try once more.
setup_fail() { echo "cluster-test: SETUP FAILED: $*" >&2; exit 3; }

# Ports 20000-29999: below the kernel's ephemeral range (32768 and up), which
# a busy machine's outgoing connections may hold when a node binds, and below
# the CLI's own distribution ports (35672-35682).
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
TAKEN=""
spare_port() {
  local p
  for _ in $(seq 1 100); do
    p=$((20000 + RANDOM % 10000))
    if port_free "$p" && ! grep -qw "$p" <<<"$TAKEN"; then echo "$p"; return; fi
  done
  echo "cluster-test: no spare port" >&2
  return 1
}

# Node i's name, ports and files.
node_name() { echo "imattr-ct$1-$SUFFIX@localhost"; }
declare -a AMQP_PORT DIST_PORT
for i in 1 2 3; do
  AMQP_PORT[$i]=$(spare_port); TAKEN="$TAKEN ${AMQP_PORT[$i]}"
  DIST_PORT[$i]=$(spare_port); TAKEN="$TAKEN ${DIST_PORT[$i]}"
done
SIM_PORT=$(spare_port); TAKEN="$TAKEN $SIM_PORT"
ADMIN_PORT=$(spare_port); TAKEN="$TAKEN $ADMIN_PORT"
ADMIN_PORT2=$(spare_port); TAKEN="$TAKEN $ADMIN_PORT2"

# Runs a RabbitMQ command as user rabbitmq for node i: its home holds the
# Erlang cookie all nodes share; the rest is the node's own environment.
as_node() {
  local i=$1 d="$WORK/n$1"
  shift
  runuser -u rabbitmq -- env HOME="$RMQ_HOME" \
    RABBITMQ_NODENAME="$(node_name "$i")" RABBITMQ_NODE_PORT="${AMQP_PORT[$i]}" \
    RABBITMQ_DIST_PORT="${DIST_PORT[$i]}" RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config" RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf" \
    RABBITMQ_MNESIA_BASE="$d/mnesia" RABBITMQ_LOG_BASE="$d/log" RABBITMQ_PID_FILE="$d/rabbit.pid" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" ERL_EPMD_ADDRESS=127.0.0.1 \
    "$@"
}
ctl() { local i=$1; shift; as_node "$i" timeout 60 /usr/lib/rabbitmq/bin/rabbitmqctl -n "$(node_name "$i")" "$@"; }

cleanup() {
  local rc=$?
  set +e
  # SIGTERM, 5 s, then SIGKILL: a stopping worker flushes for up to
  # shutdown.timeout_secs against a simulator and nodes going away.
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for _ in $(seq 1 50); do
    alive=0
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
  for i in "${STARTED[@]}"; do
    ctl "$i" stop >/dev/null 2>&1 || {
      # The node did not answer: end its own Erlang VM, found by its pid file.
      [ -s "$WORK/n$i/rabbit.pid" ] && kill "$(cat "$WORK/n$i/rabbit.pid")" 2>/dev/null
    }
  done
  if [ "$rc" != 0 ]; then
    echo "cluster-test: worker log tail:" >&2
    tail -n 30 "$WORK"/start?.log "$WORK/join.log" "$WORK/worker.log" "$WORK/worker2.log" "$WORK/simulator.log" 2>/dev/null >&2
    for i in "${STARTED[@]}"; do tail -n 5 "$WORK/n$i/log/"*@localhost.log 2>/dev/null >&2; done
  fi
  if [ -n "${KEEP:-}" ]; then echo "cluster-test: kept $WORK" >&2; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- Three nodes, one cluster ------------------------------------------------
start_node() {
  local i=$1 d="$WORK/n$1"
  mkdir -p "$d/mnesia" "$d/log"
  # Our own config: the system one pins port 5672.
  printf 'listeners.tcp.1 = 127.0.0.1:%s\nloopback_users = none\n' "${AMQP_PORT[$i]}" >"$d/rabbitmq.conf"
  echo '[].' >"$d/enabled_plugins"
  echo '[].' >"$d/advanced.config"
  : >"$d/rabbitmq-env.conf"
  chown -R rabbitmq: "$d"
  STARTED+=("$i")
  (cd "$RMQ_HOME" && as_node "$i" /usr/lib/rabbitmq/bin/rabbitmq-server -detached) >"$WORK/start$i.log" 2>&1
}
await_node() {
  local i=$1 t0=$SECONDS
  # await_startup fails at once while the VM is not registered yet: poll, bounded.
  until ctl "$i" await_startup --timeout 20 >/dev/null 2>&1; do
    [ $((SECONDS - t0)) -lt 120 ] || setup_fail "node $i did not start in 120 s"
    sleep 1
  done
}
for i in 1 2 3; do start_node "$i"; done
for i in 1 2 3; do await_node "$i"; done
say "3 nodes started in $((SECONDS - T0)) s"
# One after the other: joins at once can race on the cluster's schema. The
# CLI's complaints while a node restarts its app go to join.log.
for i in 2 3; do
  ctl "$i" stop_app >>"$WORK/join.log" 2>&1 || setup_fail "node $i: stop_app failed"
  ctl "$i" join_cluster "$(node_name 1)" >>"$WORK/join.log" 2>&1 || setup_fail "node $i: join_cluster failed"
  ctl "$i" start_app >>"$WORK/join.log" 2>&1 || setup_fail "node $i: start_app failed"
done
members=$(ctl 1 cluster_status --formatter json | jq '.running_nodes | length')
[ "$members" = 3 ] || setup_fail "the cluster has $members running nodes, not 3"
say "3 nodes up and joined in $((SECONDS - T0)) s (AMQP ports ${AMQP_PORT[*]})"

# --- Simulator and worker ----------------------------------------------------
url() { echo "amqp://guest:guest@127.0.0.1:${AMQP_PORT[$1]}/%2f"; }
export IMATTR_AMQP__URL="$(url 1),$(url 2),$(url 3)"
# The tools list node 1 first like the worker: both queues' leaders start on
# node 1, the one the worker connects to and the test stops.
PUBLISH_URLS="$(url 1),$(url 2),$(url 3)"
export IMATTR_AMQP__QUEUE="imattr.cluster.$SUFFIX.updates"
export IMATTR_AMQP__EXCHANGE="imattr.cluster.$SUFFIX.updates"
export IMATTR_AMQP__DEAD_LETTER_QUEUE="imattr.cluster.$SUFFIX.dead"
export IMATTR_AMQP__DEAD_LETTER_EXCHANGE="imattr.cluster.$SUFFIX.dead"
export IMATTR_AMQP__QUEUE_TYPE=quorum
export IMATTR_TENCENT__BASE_URL="http://127.0.0.1:$SIM_PORT"
export IMATTR_TENCENT__SDKAPPID=1400000000
export IMATTR_TENCENT__SECRET_KEY=cluster-test-secret-key
export IMATTR_ATTRIBUTES__ALLOWED='[n]'
export IMATTR_ADMIN__LISTEN="127.0.0.1:$ADMIN_PORT"
export IMATTR_BATCH__MAX_ACCOUNTS=20
export IMATTR_TENCENT__MAX_IN_FLIGHT=4
export IMATTR_RETRY__MAX_ELAPSED_SECS=0
export IMATTR_RETRY__MAX_INTERVAL_MS=1000
export IMATTR_TENCENT__TIMEOUT_MS=3500
SIM="http://127.0.0.1:$SIM_PORT/__simulator"

# Account "stuck" fails (91000) until the standby has taken over: the active
# worker holds its message unacked whenever its node stops, and the standby
# gets it redelivered.
"$BIN" simulate --listen "127.0.0.1:$SIM_PORT" --attr-names n --latency-ms 50..150 --rate-limit 0 \
  --fail-account stuck >"$WORK/simulator.log" 2>&1 &
PIDS+=($!)
if [ "${DLQ:-}" = classic ]; then
  # A classic dead-letter queue on node 1, as declared before amqp.queue_type
  # was quorum: declared with a throwaway classic updates queue and exchange.
  IMATTR_AMQP__URL="$(url 1)" IMATTR_AMQP__QUEUE_TYPE=classic \
    IMATTR_AMQP__QUEUE="$IMATTR_AMQP__QUEUE.old" IMATTR_AMQP__EXCHANGE="$IMATTR_AMQP__EXCHANGE.old" \
    "$BIN" declare >/dev/null
  ctl 1 delete_queue "$IMATTR_AMQP__QUEUE.old" >/dev/null
fi
IMATTR_AMQP__URL="$PUBLISH_URLS" "$BIN" declare >/dev/null  # declares the topology on node 1
dlq_type=$(ctl 1 list_queues -q --no-table-headers name type | awk -v q="$IMATTR_AMQP__DEAD_LETTER_QUEUE" '$1 == q { print $2 }')
want_type=stream; [ "${DLQ:-}" = classic ] && want_type=classic
[ "$dlq_type" = "$want_type" ] || fail "the dead-letter queue is ${dlq_type:-missing}, not $want_type"
"$BIN" run >"$WORK/worker.log" 2>&1 &
WORKER=$!
PIDS+=("$WORKER")
# On a quorum queue the worker reports active only from its first delivery:
# wait for it to be consuming (active or standing by).
consuming() { grep -q "Active: this worker\|Standing by" "$1"; }
for _ in $(seq 1 600); do
  consuming "$WORK/worker.log" && break
  sleep 0.2
done
consuming "$WORK/worker.log" || fail "the worker did not start consuming"

# Values only grow: message k sets account acc(k*7919 mod ACCOUNTS) to k.
stream() { # from count
  awk -v from="$1" -v n="$2" -v accounts="$ACCOUNTS" 'BEGIN {
    for (k = from; k < from + n; k++)
      printf "{\"To_Account\":\"acc%d\",\"Attrs\":{\"n\":\"%d\"}}\n", (k * 7919) % accounts, k }'
}
written() { curl -sf "$SIM/stats" | jq '.accounts_written' || echo 0; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }

# list_connections shows the whole cluster's connections; a connection's
# pid (<node.N.N.N>) names the node it lives on. Found before publishing, so
# that the stop follows the first writes closely.
holder=$(ctl 1 list_connections -q --no-table-headers pid client_properties |
  grep -F "imattr run $IMATTR_AMQP__QUEUE pid $WORKER" | awk '{ print $1 }' | head -n 1)
victim=""
for i in 1 2 3; do [[ "$holder" == "<$(node_name "$i")."* ]] && victim=$i; done
[ -n "$victim" ] || fail "no node holds the worker's connection"

# The standby: registered second, connected to another node (its URL list
# starts with the next one), so its consumer outlives the stop.
other=$((victim % 3 + 1))
urls2=""
for k in 0 1 2; do urls2="$urls2${urls2:+,}$(url $(((other - 1 + k) % 3 + 1)))"; done
IMATTR_AMQP__URL="$urls2" IMATTR_ADMIN__LISTEN="127.0.0.1:$ADMIN_PORT2" "$BIN" run >"$WORK/worker2.log" 2>&1 &
WORKER2=$!
PIDS+=("$WORKER2")
for _ in $(seq 1 600); do
  consuming "$WORK/worker2.log" && break
  sleep 0.2
done
consuming "$WORK/worker2.log" || fail "the standby did not start consuming"
holder2=$(ctl 1 list_connections -q --no-table-headers pid client_properties |
  grep -F "imattr run $IMATTR_AMQP__QUEUE pid $WORKER2" | awk '{ print $1 }' | head -n 1)
[ -n "$holder2" ] || fail "no node holds the standby's connection"
[[ "$holder2" == "<$(node_name "$victim")."* ]] && fail "the standby is connected to node $victim too"

# Each worker's role (its /healthz: "ok: active" or "ok: standby") and counters.
role() { curl -sf "http://127.0.0.1:$1/healthz" | awk '{ print $2 }'; }
metric() { curl -sf "http://127.0.0.1:$2/metrics" | awk -v m="$1" '$1 ~ "^" m { n += $2 } END { print n + 0 }'; }
# roles_are ACTIVE_PORT STANDBY_PORT: exactly one active worker, that one.
roles_are() { [ "$(role "$1")" = active ] && [ "$(role "$2")" = standby ]; }

# The worker applies about 800 accounts a second (4 requests of 20 accounts
# in flight, 50-150 ms each): the first half takes seconds, so it is
# mid-stream, holding unacked messages, when its node stops.
HALF=$((MESSAGES / 2))
STUCK='{"To_Account":"stuck","Attrs":{"n":"1"}}'
{ echo "$STUCK"; stream 0 "$HALF"; } | IMATTR_AMQP__URL="$PUBLISH_URLS" "$BIN" publish --file - >/dev/null
refused() { curl -sf "$SIM/stats" | jq '.requests.im_set_attr."91000" // 0' || echo 0; }
for _ in $(seq 1 300); do
  [ "$(written)" -gt 200 ] && [ "$(refused)" -gt 0 ] && break
  sleep 0.1
done

# --- Stop the worker's node mid-stream ----------------------------------------
roles_are "$ADMIN_PORT" "$ADMIN_PORT2" ||
  fail "before the stop: worker 1 is $(role "$ADMIN_PORT"), the standby $(role "$ADMIN_PORT2"); want active, standby"
before=$(written)
# Mid-stream, enforced: the active worker holds messages it has not settled
# ("stuck"'s at least; its own counters: the broker's for a quorum queue lag
# by seconds).
held=$(( $(metric imattr_messages_received_total "$ADMIN_PORT") - $(metric imattr_messages_acked_total "$ADMIN_PORT") ))
[ "$held" -gt 0 ] || fail "not mid-stream: the active worker holds nothing unsettled ($before accounts written)"
say "stopping node $victim (the active worker's) after $before accounts written, $held messages held"
stopped_at=$(now_ms)
ctl "$victim" stop >/dev/null
# The standby takes over (its log: its first delivery) and the API's count
# grows again (a redelivery first holds requests for amqp.takeover_hold_ms: lease + timeout + 3 s); the
# worker that lost its node connects to another and registers as a standby.
plain_log() { sed 's/\x1b\[[0-9;]*m//g' "$1"; }
connects() { plain_log "$WORK/worker.log" | grep -c "Connected to RabbitMQ" || true; }
log_ms() { date -d "$1" +%s%3N; }
for _ in $(seq 1 1200); do
  [ "$(role "$ADMIN_PORT2")" = active ] && break
  sleep 0.1
done
[ "$(role "$ADMIN_PORT2")" = active ] || fail "the standby did not take over"
took_over=$(written)
for _ in $(seq 1 1200); do
  [ "$(written)" -gt "$took_over" ] && break
  sleep 0.1
done
[ "$(written)" -gt "$took_over" ] || fail "nothing applied after the takeover"
applying_ms=$(($(now_ms) - stopped_at))
# What worker 1 held unacked came back to the standby, "stuck"'s message at
# least; then "stuck" may succeed.
for _ in $(seq 1 1200); do
  [ "$(metric imattr_messages_redelivered_total "$ADMIN_PORT2")" -gt 0 ] && break
  sleep 0.1
done
[ "$(metric imattr_messages_redelivered_total "$ADMIN_PORT2")" -gt 0 ] ||
  fail "nothing was redelivered to the standby that took over"
curl -sf "$SIM/faults" | jq -c '.fail_accounts = []' |
  curl -sf -X POST -H 'content-type: application/json' --data-binary @- "$SIM/faults" ||
  fail "could not clear the simulator's failing account"
for _ in $(seq 1 1200); do
  [ "$(connects)" -ge 2 ] && [ "$(role "$ADMIN_PORT")" = standby ] && break
  sleep 0.1
done
[ "$(connects)" -ge 2 ] || fail "worker 1 did not connect to another node"
roles_are "$ADMIN_PORT2" "$ADMIN_PORT" ||
  fail "after the stop: the standby is $(role "$ADMIN_PORT2"), worker 1 $(role "$ADMIN_PORT"); want active, standby"
plain_log "$WORK/worker.log" | grep -q "Lost the broker session" || fail "no lost session in worker 1's log"
back_at=$(plain_log "$WORK/worker2.log" | awk '/Active: this worker/ { print $1; exit }')
[ -n "$back_at" ] || fail "no takeover in the standby's log"
consuming_ms=$(($(log_ms "$back_at") - stopped_at))
failed_sessions=$(plain_log "$WORK/worker.log" | grep -c "Broker session failed" || true)
# Publish the rest while the cluster runs on two nodes.
stream "$HALF" $((MESSAGES - HALF)) | IMATTR_AMQP__URL="$PUBLISH_URLS" "$BIN" publish --file - >/dev/null

# --- Wait for the end and check -----------------------------------------------
{ echo "$STUCK"; stream 0 "$MESSAGES"; } | jq -s 'map({(.To_Account): {n: .Attrs.n}}) | add' >"$WORK/expected.json"
live=$(( victim == 1 ? 2 : 1 ))
depth() { ctl "$live" list_queues -q --no-table-headers name messages | awk -v q="$1" '$1 == q { print $2 }'; }
t_end=$((SECONDS + 240))
until curl -sf "$SIM/state" | jq -S . | cmp -s - <(jq -S . "$WORK/expected.json"); do
  [ $SECONDS -lt $t_end ] || fail "the API's state is not the last value published per account"
  sleep 0.5
done
until [ "$(depth "$IMATTR_AMQP__QUEUE")" = 0 ]; do
  [ $SECONDS -lt $t_end ] || fail "messages left in $IMATTR_AMQP__QUEUE"
  sleep 0.5
done
stats=$(curl -sf "$SIM/stats")
overlaps=$(jq '.overlapping_account_requests' <<<"$stats")
regressions=$(jq '.regressions // 0' <<<"$stats")
[ "$overlaps" = 0 ] || fail "$overlaps times an account was in two requests at once"
[ "$regressions" = 0 ] || fail "$regressions values went backwards"
# Dead letters: the workers' counts, and the queue's depth unless it is the
# classic queue on the stopped node.
dead=$(( $(metric imattr_messages_dead_lettered_total "$ADMIN_PORT") + $(metric imattr_messages_dead_lettered_total "$ADMIN_PORT2") ))
[ "$dead" = 0 ] || fail "$dead messages dead-lettered"
if [ "$dlq_type" = stream ]; then
  dead=$(depth "$IMATTR_AMQP__DEAD_LETTER_QUEUE")
  [ "$dead" = 0 ] || fail "$dead messages in $IMATTR_AMQP__DEAD_LETTER_QUEUE"
fi
redelivered=$(metric imattr_messages_redelivered_total "$ADMIN_PORT2")
roles_are "$ADMIN_PORT2" "$ADMIN_PORT" || fail "at the end: exactly one active worker, the one that took over"
kill -TERM "$WORKER" "$WORKER2"
wait "$WORKER" || fail "worker 1 did not stop cleanly"
wait "$WORKER2" || fail "the standby that took over did not stop cleanly"
reconnects=$(($(connects) - 1))
say "OK: $MESSAGES messages over $ACCOUNTS accounts, node $victim stopped mid-stream after $before accounts written with $held messages held; the standby consuming ${consuming_ms} ms and applying ${applying_ms} ms after the stop command; worker 1 back as a standby ($reconnects reconnect(s), $failed_sessions failed session(s)); $redelivered messages redelivered; dead-letter queue $dlq_type; last value wins, 0 overlaps, 0 regressions, 0 dead letters; $((SECONDS - T0)) s in all"
