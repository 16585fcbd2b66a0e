#!/usr/bin/env bash
# docker-compose.yml without a Docker engine: it parses, a plain `docker compose up`
# starts the simulator the worker points at, and the simulator has a health check of
# its own (the image's asks the worker's /healthz, which the simulator does not serve).
set -euo pipefail
cd "$(dirname "$0")/.."
docker-compose -f docker-compose.yml config -q
docker-compose -f docker-compose.yml config | python3 -c '
import sys, yaml
services = yaml.safe_load(sys.stdin)["services"]
sim, worker = services["simulator"], services["imattr"]
assert not sim.get("profiles") and not worker.get("profiles"), "a plain `docker compose up` must start them"
listen = sim["command"][sim["command"].index("--listen") + 1]
port = listen.rsplit(":", 1)[1]
assert any(port in str(word) for word in sim["healthcheck"]["test"]), "the simulator needs a health check of its own, on " + port
assert not sim["healthcheck"].get("disable"), "the simulator health check is disabled"
assert worker["environment"]["IMATTR_TENCENT__BASE_URL"] == "http://simulator:" + port
assert worker["depends_on"]["simulator"]["condition"] == "service_healthy"
for key in ("IMATTR_TENCENT__SDKAPPID", "IMATTR_TENCENT__SECRET_KEY"):
    assert sim["environment"][key] == worker["environment"][key], key + " differs between the simulator and the worker"
print("docker-compose.yml: ok")
'
