#!/usr/bin/env bash
# Runs the publisher examples of docs/examples against the local RabbitMQ and checks that
# each message arrives with the body, routing key and properties imattr expects, and that
# each example fails when its message is routed nowhere.
#
#   scripts/test-publishers.sh            # Python and Node.js; Go when it can be built
#   REQUIRE_GO=1 scripts/test-publishers.sh   # fail instead of skipping Go
#
# Needs python3 (with venv), node and npm; pika and amqplib are installed into a temporary
# directory. Go needs Debian's golang-go and golang-github-rabbitmq-amqp091-go-dev (built in
# GOPATH mode from /usr/share/gocode, no module download). Java is not tested.
# AMQP_URL overrides the broker (default amqp://guest:guest@127.0.0.1:5672/%2f).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
examples="$root/docs/examples"

export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
work=$(mktemp -d)
suffix="$(date +%s).$$.$RANDOM"
export TEST_EXCHANGE="imattr.test.publishers.$suffix"
export TEST_QUEUE="imattr.test.publishers.$suffix"
export TEST_DEAD_END="imattr.test.publishers.$suffix.unbound"

py() { "$work/venv/bin/python" "$@"; }

cleanup() {
  if [ -x "$work/venv/bin/python" ]; then
    py - <<'EOF' || true
import os, pika
conn = pika.BlockingConnection(pika.URLParameters(os.environ["AMQP_URL"]))
ch = conn.channel()
ch.queue_delete(os.environ["TEST_QUEUE"])
ch.exchange_delete(os.environ["TEST_EXCHANGE"])
ch.exchange_delete(os.environ["TEST_DEAD_END"])
conn.close()
EOF
  fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "== installing pika and amqplib into $work"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check pika
(cd "$work" && npm install --silent --no-audit --no-fund --no-save amqplib >/dev/null)
export NODE_PATH="$work/node_modules"

# A fanout exchange like imattr's, bound to a queue of our own; and one bound to nothing.
py - <<'EOF'
import os, pika
conn = pika.BlockingConnection(pika.URLParameters(os.environ["AMQP_URL"]))
ch = conn.channel()
ch.exchange_declare(os.environ["TEST_EXCHANGE"], exchange_type="fanout", durable=True)
ch.exchange_declare(os.environ["TEST_DEAD_END"], exchange_type="fanout", durable=True)
ch.queue_declare(os.environ["TEST_QUEUE"], durable=True)
ch.queue_bind(os.environ["TEST_QUEUE"], os.environ["TEST_EXCHANGE"])
conn.close()
EOF

# check NAME ACCOUNT ATTRS: exactly one message waits, and it is the expected update.
check() {
  NAME="$1" ACCOUNT="$2" ATTRS="$3" py - <<'EOF'
import json, os, sys, pika
name, account = os.environ["NAME"], os.environ["ACCOUNT"]
attrs = json.loads(os.environ["ATTRS"])
conn = pika.BlockingConnection(pika.URLParameters(os.environ["AMQP_URL"]))
ch = conn.channel()
method, props, body = ch.basic_get(os.environ["TEST_QUEUE"], auto_ack=True)
extra = ch.basic_get(os.environ["TEST_QUEUE"], auto_ack=True)[0]
conn.close()
problems = []
if method is None:
    problems.append("no message arrived")
else:
    if method.routing_key != account:
        problems.append(f"routing key {method.routing_key!r}, expected {account!r}")
    if props.content_type != "application/json":
        problems.append(f"content type {props.content_type!r}")
    if props.delivery_mode != 2:
        problems.append(f"delivery mode {props.delivery_mode!r}, expected 2 (persistent)")
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        doc = None
        problems.append(f"body is not UTF-8 JSON: {e}")
    if doc is not None and doc != {"To_Account": account, "Attrs": attrs}:
        problems.append(f"body {doc!r}")
if extra is not None:
    problems.append("more than one message arrived")
if problems:
    print(f"FAIL {name}: " + "; ".join(problems))
    sys.exit(1)
print(f"ok   {name}: routing key, content type, persistence and body as expected")
EOF
}

passed=0
failed=0
# run NAME COMMAND...: publish through the test exchange, check; then publish to the
# exchange bound to nothing, which must fail as unroutable: exit status 1 and the
# examples' own words for it (any other failure, a crash or a refused connection,
# is not that).
run() {
  local name="$1"
  shift
  local account="acct-$name-$RANDOM"
  # A value, a non-ASCII value and a removal (null).
  local attrs='{"sex":"f","city":"深圳","tier":null}'
  if IMATTR_EXCHANGE="$TEST_EXCHANGE" ACCOUNT="$account" ATTRS="$attrs" "$@" >"$work/out" 2>&1 &&
    check "$name" "$account" "$attrs"; then
    passed=$((passed + 1))
  else
    echo "FAIL $name:"
    sed 's/^/    /' "$work/out"
    failed=$((failed + 1))
  fi
  local rc=0
  IMATTR_EXCHANGE="$TEST_DEAD_END" ACCOUNT="$account" ATTRS="$attrs" "$@" >"$work/out" 2>&1 || rc=$?
  local unroutable="not published: exchange $TEST_DEAD_END routed the message to no queue"
  if [ "$rc" = 0 ]; then
    echo "FAIL $name: reported success for a message routed to no queue"
    failed=$((failed + 1))
  elif [ "$rc" = 1 ] && grep -qF -- "$unroutable" "$work/out"; then
    echo "ok   $name: a message routed to no queue is reported ($(tail -n1 "$work/out"))"
    passed=$((passed + 1))
  else
    echo "FAIL $name: exit $rc without \"$unroutable\":"
    sed 's/^/    /' "$work/out"
    failed=$((failed + 1))
  fi
}

run python py "$examples/python/publish.py"
run node node "$examples/node/publish.js"

gocode=/usr/share/gocode
if command -v go >/dev/null && [ -d "$gocode/src/github.com/rabbitmq/amqp091-go" ]; then
  echo "== building the Go example against $gocode"
  mkdir -p "$work/gopath"
  # GOPATH mode: the library comes from Debian's package, nothing is downloaded.
  if (cd "$examples/go" && GO111MODULE=off GOPATH="$work/gopath:$gocode" GOCACHE="$work/gocache" \
    GOFLAGS= go build -o "$work/publish-go" main.go); then
    run go "$work/publish-go"
  else
    echo "FAIL go: does not build"
    failed=$((failed + 1))
  fi
elif [ "${REQUIRE_GO:-}" = 1 ]; then
  echo "FAIL go: needs golang-go and golang-github-rabbitmq-amqp091-go-dev"
  failed=$((failed + 1))
else
  echo "skip go: install golang-go and golang-github-rabbitmq-amqp091-go-dev to test it"
fi
echo "skip java: not tested (docs/examples/java/Publish.java)"

echo "publishers: $passed passed, $failed failed"
[ "$failed" = 0 ]
