#!/usr/bin/env bash
# TLS to the broker, end to end (docs/operations-tls.md): makes a CA, a server
# certificate and client certificates with openssl, starts a separate RabbitMQ
# node of the installed package with a TLS listener on spare ports, then checks
#   - publish, run (against the simulator) and dlq over amqps:// with amqp.tls_ca_file;
#   - mutual TLS (ssl_options.verify = verify_peer, fail_if_no_peer_cert = true);
#   - EXTERNAL login with the client certificate's CN as the user;
#   - that each failure gives its one-line message, never the "is RabbitMQ running?" hint;
#   - that bad TLS settings are configuration errors (exit 2) naming the key.
# It stops only the node it started (never the broker on 5672). Needs root
# (it runs the node as the rabbitmq user). Usage: scripts/tls-test.sh
# (KEEP=1 keeps its temporary directory, with certificates and logs).
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "tls-test: run as root (the node runs as user rabbitmq)" >&2; exit 1; }
if ! command -v openssl >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl
fi
command -v rabbitmq-server >/dev/null || { echo "tls-test: rabbitmq-server is not installed" >&2; exit 1; }
ls -d /usr/lib/rabbitmq/lib/rabbitmq_server-*/plugins/rabbitmq_auth_mechanism_ssl-* >/dev/null ||
  { echo "tls-test: the rabbitmq_auth_mechanism_ssl plugin is missing" >&2; exit 1; }

cargo build --locked --quiet
BIN=$PWD/target/debug/imattr

SUFFIX=$$-$RANDOM
NODE="imattr-tls-$SUFFIX@localhost"
WORK=$(mktemp -d /tmp/imattr-tls.XXXXXX)
chmod 755 "$WORK"
RMQ_HOME=$(getent passwd rabbitmq | cut -d: -f6)
PIDS=()
NODE_STARTED=0
FAILED=0

# Runs a RabbitMQ CLI as user rabbitmq, with its home (the shared Erlang cookie)
# and the test node's environment.
as_rabbitmq() {
  runuser -u rabbitmq -- env HOME="$RMQ_HOME" \
    RABBITMQ_NODENAME="$NODE" RABBITMQ_NODE_PORT="$PLAIN_PORT" RABBITMQ_DIST_PORT="$DIST_PORT" \
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
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  if [ "$NODE_STARTED" = 1 ]; then
    ctl stop >/dev/null 2>&1 || {
      # The node did not answer: end its own Erlang VM, found by its pid file.
      [ -s "$WORK/rabbit.pid" ] && kill "$(cat "$WORK/rabbit.pid")" 2>/dev/null
    }
  fi
  if [ "$rc" != 0 ] || [ "$FAILED" != 0 ]; then
    echo "tls-test: FAILED; node log:" >&2
    tail -n 30 "$WORK"/log/*.log 2>/dev/null >&2
  fi
  if [ -n "${KEEP:-}" ]; then echo "tls-test: kept $WORK" >&2; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# A port nothing listens on and not handed out yet (the caller adds it to TAKEN),
# in 20000-29999: below the kernel's ephemeral range (32768 and up), which a
# busy machine's outgoing connections may hold when the node binds, and below
# the CLI's own distribution ports (35672-35682).
spare_port() {
  local p
  for _ in $(seq 1 100); do
    p=$((20000 + RANDOM % 10000))
    if port_free "$p" && ! grep -qw "$p" <<<"$TAKEN"; then echo "$p"; return; fi
  done
  echo "tls-test: no spare port" >&2; return 1
}
TAKEN=""
PLAIN_PORT=$(spare_port); TAKEN="$TAKEN $PLAIN_PORT"
TLS_PORT=$(spare_port); TAKEN="$TAKEN $TLS_PORT"
DIST_PORT=$(spare_port); TAKEN="$TAKEN $DIST_PORT"
EXPIRED_PORT=$(spare_port); TAKEN="$TAKEN $EXPIRED_PORT"
SIM_PORT=$(spare_port); TAKEN="$TAKEN $SIM_PORT"
CLOSED_PORT=$(spare_port); TAKEN="$TAKEN $CLOSED_PORT"
STREAM_PORT=$(spare_port); TAKEN="$TAKEN $STREAM_PORT"
STREAM_TLS_PORT=$(spare_port); TAKEN="$TAKEN $STREAM_TLS_PORT"

# --- Certificates -----------------------------------------------------------
C=$WORK/certs
mkdir -p "$C"
USER_CN=imattr-tls-client
ec_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
ca() { # name
  ec_key "$C/$1.key"
  openssl req -x509 -new -key "$C/$1.key" -subj "/CN=$1" -days 2 -out "$C/$1.pem" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
}
leaf() { # name CN ca days extensions
  ec_key "$C/$1.key"
  openssl req -new -key "$C/$1.key" -subj "/CN=$2" -out "$C/$1.csr" 2>/dev/null
  printf '%s\n' "$5" >"$C/$1.ext"
  openssl x509 -req -in "$C/$1.csr" -CA "$C/$3.pem" -CAkey "$C/$3.key" -CAcreateserial \
    -days "$4" -extfile "$C/$1.ext" -out "$C/$1.pem" 2>/dev/null
}
SERVER_EXT=$'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth'
CLIENT_EXT='extendedKeyUsage=clientAuth'
ca ca
ca rogue-ca
leaf server localhost ca 2 "$SERVER_EXT"
leaf expired localhost ca -1 "$SERVER_EXT"
leaf client "$USER_CN" ca 2 "$CLIENT_EXT"
leaf stranger nobody-known ca 2 "$CLIENT_EXT"
leaf rogue-client "$USER_CN" rogue-ca 2 "$CLIENT_EXT"
chown -R rabbitmq: "$C"
chmod 644 "$C"/*

# --- The TLS node -----------------------------------------------------------
mkdir -p "$WORK/mnesia" "$WORK/log"
chown rabbitmq: "$WORK/mnesia" "$WORK/log"
# The stream plugin: the dlq commands read the dead-letter stream over its TLS listener.
echo '[rabbitmq_auth_mechanism_ssl,rabbitmq_stream].' >"$WORK/enabled_plugins"
echo '[].' >"$WORK/advanced.config"
: >"$WORK/rabbitmq-env.conf"
write_node_config() { # fail_if_no_peer_cert
  cat >"$WORK/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$PLAIN_PORT
listeners.ssl.1 = 127.0.0.1:$TLS_PORT
# Another loopback address, for a name the certificate does not list.
listeners.ssl.2 = 127.0.0.2:$TLS_PORT
# Spare ports: the machine's own broker holds 5552.
stream.listeners.tcp.1 = 127.0.0.1:$STREAM_PORT
stream.listeners.ssl.1 = 127.0.0.1:$STREAM_TLS_PORT
ssl_options.cacertfile = $C/ca.pem
ssl_options.certfile = $C/server.pem
ssl_options.keyfile = $C/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = $1
auth_mechanisms.1 = PLAIN
auth_mechanisms.2 = EXTERNAL
ssl_cert_login_from = common_name
EOF
  chmod 644 "$WORK/rabbitmq.conf" "$WORK/enabled_plugins" "$WORK/advanced.config" "$WORK/rabbitmq-env.conf"
}
start_node() {
  echo "tls-test: starting node $NODE (plain $PLAIN_PORT, TLS $TLS_PORT, dist $DIST_PORT)"
  NODE_STARTED=1
  (cd "$RMQ_HOME" && as_rabbitmq /usr/lib/rabbitmq/bin/rabbitmq-server -detached) >/dev/null
  # await_startup fails at once while the VM is not registered yet: poll, bounded.
  local t0=$SECONDS
  until ctl await_startup --timeout 20 >/dev/null 2>&1; do
    if [ $((SECONDS - t0)) -gt 90 ]; then echo "tls-test: node did not start in 90 s" >&2; return 1; fi
    sleep 1
  done
  echo "tls-test: node up in $((SECONDS - t0)) s"
}
write_node_config false
start_node
ctl add_user "$USER_CN" "unused-$RANDOM" >/dev/null
ctl clear_password "$USER_CN" >/dev/null
ctl set_permissions -p / "$USER_CN" '.*' '.*' '.*' >/dev/null

# An HTTPS-less TLS server with an expired certificate: only its handshake matters.
openssl s_server -quiet -accept "127.0.0.1:$EXPIRED_PORT" -cert "$C/expired.pem" -key "$C/expired.key" \
  </dev/null >/dev/null 2>&1 &
PIDS+=($!)

"$BIN" simulate --listen "127.0.0.1:$SIM_PORT" --attr-names sex,city >"$WORK/sim.log" 2>&1 &
PIDS+=($!)

# --- Helpers ----------------------------------------------------------------
Q=imattr.tls.$SUFFIX
BASE_ENV=(
  IMATTR_CONFIG=/dev/null
  IMATTR_AMQP__EXCHANGE="$Q" IMATTR_AMQP__QUEUE="$Q"
  IMATTR_AMQP__DEAD_LETTER_EXCHANGE="$Q.dead" IMATTR_AMQP__DEAD_LETTER_QUEUE="$Q.dead"
  IMATTR_TENCENT__BASE_URL="http://127.0.0.1:$SIM_PORT" IMATTR_TENCENT__SDKAPPID=1400000000
  IMATTR_TENCENT__SECRET_KEY=5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e
  IMATTR_ADMIN__LISTEN= IMATTR_BATCH__MAX_WAIT_MS=20
)
base_env() { env "${BASE_ENV[@]}" "$@"; }
TLS_URL="amqps://guest:guest@127.0.0.1:$TLS_PORT/%2f"
# With EXTERNAL the user comes from the certificate: a PLAIN login with these would fail.
EXTERNAL_URL="amqps://nobody:wrong@127.0.0.1:$TLS_PORT/%2f"
pass() { echo "ok   $1"; }
fail() { echo "FAIL $1" >&2; FAILED=1; }

# expect_error NAME EXIT TEXT [ENV=VALUE…] -- runs `imattr publish` and checks
# its exit status and that stderr holds TEXT and not the start hint (unless TEXT is it).
expect_error() {
  local name=$1 want_rc=$2 text=$3; shift 3
  local out rc=0
  out=$(base_env "$@" timeout 30 "$BIN" publish --account tls-err --attr sex=x 2>&1 >/dev/null) || rc=$?
  if [ "$rc" != "$want_rc" ]; then fail "$name: exit $rc, want $want_rc: $out"; return; fi
  if ! grep -qF -- "$text" <<<"$out"; then fail "$name: no \"$text\" in: $out"; return; fi
  if [ "$text" != "rabbitmq-server -detached" ] && grep -q "RabbitMQ running" <<<"$out"; then
    fail "$name: start hint in: $out"; return
  fi
  [ "$(wc -l <<<"$out")" = 1 ] || { fail "$name: more than one line: $out"; return; }
  pass "$name: $out"
}

# --- 1. declare, publish, run and dlq over amqps:// with the CA file ---------
CA_ENV=(IMATTR_AMQP__URL="$TLS_URL" IMATTR_AMQP__TLS_CA_FILE="$C/ca.pem" IMATTR_AMQP__STREAM_PORT="$STREAM_TLS_PORT")
# Only run and declare create the updates queue; publish needs it bound.
if base_env "${CA_ENV[@]}" timeout 30 "$BIN" declare >/dev/null; then pass "declare over amqps://"; else fail "declare over amqps://"; fi
base_env "${CA_ENV[@]}" timeout 30 "$BIN" publish --account tls-a --attr sex=f >/dev/null
# Not through a function: $! must be imattr's own pid (env execs it) for SIGTERM.
env "${BASE_ENV[@]}" "${CA_ENV[@]}" "$BIN" run >"$WORK/run.log" 2>&1 &
RUN_PID=$!
PIDS+=("$RUN_PID")
applied() { base_env timeout 10 "$BIN" get "$1" 2>/dev/null | grep -qF "\"$2\":\"$3\""; }
for _ in $(seq 1 60); do applied tls-a sex f && break; sleep 0.5; done
if applied tls-a sex f; then pass "run over amqps:// with amqp.tls_ca_file applied the update"; else fail "run did not apply the update: $(tail -3 "$WORK/run.log")"; fi
kill -TERM "$RUN_PID"
timeout 40 tail --pid="$RUN_PID" -f /dev/null || kill -KILL "$RUN_PID"
rc=0; wait "$RUN_PID" || rc=$?
if [ "$rc" = 0 ]; then pass "run stopped cleanly on SIGTERM"; else fail "run exit status $rc on SIGTERM"; fi
if base_env "${CA_ENV[@]}" timeout 30 "$BIN" dlq list >/dev/null; then pass "dlq list over amqps://"; else fail "dlq list over amqps://"; fi

# --- 2. EXTERNAL login with the client certificate's CN --------------------
CLIENT_ENV=(IMATTR_AMQP__TLS_CERT_FILE="$C/client.pem" IMATTR_AMQP__TLS_KEY_FILE="$C/client.key")
if base_env "${CA_ENV[@]}" "${CLIENT_ENV[@]}" IMATTR_AMQP__AUTH_MECHANISM=external \
  IMATTR_AMQP__URL="$EXTERNAL_URL" timeout 30 "$BIN" publish --account tls-b --attr sex=m >/dev/null; then
  pass "EXTERNAL login as $USER_CN (publish)"
else
  fail "EXTERNAL login as $USER_CN"
fi
# RabbitMQ's stream plugin supports EXTERNAL only since a fix of mid-2023: on an older
# broker the command must say so in one line.
rc=0
out=$(base_env "${CA_ENV[@]}" "${CLIENT_ENV[@]}" IMATTR_AMQP__AUTH_MECHANISM=external \
  IMATTR_AMQP__URL="$EXTERNAL_URL" timeout 30 "$BIN" dlq list 2>&1 >/dev/null) || rc=$?
if [ "$rc" = 0 ]; then
  pass "dlq list over amqps:// with an EXTERNAL login"
elif grep -qF "do not support EXTERNAL on the stream protocol" <<<"$out"; then
  pass "dlq list over amqps:// with an EXTERNAL login: this broker cannot, and says so: $out"
else
  fail "dlq list over amqps:// with an EXTERNAL login: exit $rc: $out"
fi

# --- 3. Errors that name the cause ------------------------------------------
expect_error "certificate not trusted (no CA file)" 1 "not signed by a CA the system trusts" IMATTR_AMQP__URL="$TLS_URL"
expect_error "certificate not trusted (other CA)" 1 "not signed by a CA in amqp.tls_ca_file ($C/rogue-ca.pem)" \
  IMATTR_AMQP__URL="$TLS_URL" IMATTR_AMQP__TLS_CA_FILE="$C/rogue-ca.pem"
expect_error "name mismatch" 1 "does not name the host" \
  IMATTR_AMQP__URL="amqps://guest:guest@127.0.0.2:$TLS_PORT/%2f" IMATTR_AMQP__TLS_CA_FILE="$C/ca.pem"
expect_error "expired" 1 "has expired" \
  IMATTR_AMQP__URL="amqps://guest:guest@127.0.0.1:$EXPIRED_PORT/%2f" IMATTR_AMQP__TLS_CA_FILE="$C/ca.pem"
# Under TLS 1.3 the broker's alert or its reset may come first: both name the file.
expect_error "client certificate refused" 1 "refused the client certificate amqp.tls_cert_file ($C/rogue-client.pem)" \
  "${CA_ENV[@]}" IMATTR_AMQP__TLS_CERT_FILE="$C/rogue-client.pem" IMATTR_AMQP__TLS_KEY_FILE="$C/rogue-client.key"
expect_error "key of another certificate" 1 "amqp.tls_key_file ($C/stranger.key) is not the private key of amqp.tls_cert_file ($C/client.pem)" \
  "${CA_ENV[@]}" IMATTR_AMQP__TLS_CERT_FILE="$C/client.pem" IMATTR_AMQP__TLS_KEY_FILE="$C/stranger.key"
expect_error "EXTERNAL user unknown" 1 "refused the EXTERNAL login" \
  "${CA_ENV[@]}" IMATTR_AMQP__TLS_CERT_FILE="$C/stranger.pem" IMATTR_AMQP__TLS_KEY_FILE="$C/stranger.key" \
  IMATTR_AMQP__AUTH_MECHANISM=external
expect_error "TLS spoken to a plain port" 1 "amqps:// (TLS) spoken to a port that speaks plain AMQP" \
  IMATTR_AMQP__URL="amqps://guest:guest@127.0.0.1:$PLAIN_PORT/%2f" IMATTR_AMQP__TLS_CA_FILE="$C/ca.pem"
expect_error "plain spoken to a TLS port" 1 "amqp:// (plain) spoken to a port that speaks TLS" \
  IMATTR_AMQP__URL="amqp://guest:guest@127.0.0.1:$TLS_PORT/%2f"
expect_error "connection refused" 1 "rabbitmq-server -detached" \
  IMATTR_AMQP__URL="amqps://guest:guest@127.0.0.1:$CLOSED_PORT/%2f" IMATTR_AMQP__TLS_CA_FILE="$C/ca.pem"

# Configuration errors: exit 2, naming the key (and the file).
expect_error "cert without key" 2 "amqp.tls_key_file" "${CA_ENV[@]}" IMATTR_AMQP__TLS_CERT_FILE="$C/client.pem"
expect_error "key without cert" 2 "amqp.tls_cert_file" "${CA_ENV[@]}" IMATTR_AMQP__TLS_KEY_FILE="$C/client.key"
expect_error "EXTERNAL without a client certificate" 2 "amqp.auth_mechanism" "${CA_ENV[@]}" IMATTR_AMQP__AUTH_MECHANISM=external
expect_error "unreadable CA file" 2 "$WORK/nope.pem" IMATTR_AMQP__URL="$TLS_URL" IMATTR_AMQP__TLS_CA_FILE="$WORK/nope.pem"
expect_error "key file is no key" 2 "amqp.tls_key_file" "${CA_ENV[@]}" \
  IMATTR_AMQP__TLS_CERT_FILE="$C/client.pem" IMATTR_AMQP__TLS_KEY_FILE="$C/client.pem"
expect_error "TLS settings on amqp://" 2 "must start with amqps://" \
  IMATTR_AMQP__URL="amqp://guest:guest@127.0.0.1:$PLAIN_PORT/%2f" IMATTR_AMQP__TLS_CA_FILE="$C/ca.pem"

# --- 4. Mutual TLS: the node now refuses connections without a client certificate.
ctl stop >/dev/null
NODE_STARTED=0
write_node_config true
start_node
expect_error "client certificate required" 1 "requires a client certificate" "${CA_ENV[@]}"
if base_env "${CA_ENV[@]}" "${CLIENT_ENV[@]}" timeout 30 "$BIN" publish --account tls-c --attr sex=f >/dev/null; then
  pass "mutual TLS (fail_if_no_peer_cert = true) with PLAIN login"
else
  fail "mutual TLS (fail_if_no_peer_cert = true) with PLAIN login"
fi
if base_env "${CA_ENV[@]}" "${CLIENT_ENV[@]}" IMATTR_AMQP__AUTH_MECHANISM=external \
  IMATTR_AMQP__URL="$EXTERNAL_URL" timeout 30 "$BIN" publish --account tls-d --attr sex=m >/dev/null; then
  pass "mutual TLS with EXTERNAL login"
else
  fail "mutual TLS with EXTERNAL login"
fi

[ "$FAILED" = 0 ] || exit 1
echo "tls-test: all passed in ${SECONDS}s"
