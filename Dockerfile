# imattr: a release build on a small non-root image. Not built by CI (no Docker engine
# there); see docs/operations.md ("Docker").
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked && strip target/release/imattr

FROM debian:bookworm-slim
# ca-certificates for the API's and the broker's TLS; curl for the health check only.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin imattr
COPY --from=build /src/target/release/imattr /usr/local/bin/imattr
COPY config/imattr.toml /etc/imattr/imattr.toml
ENV IMATTR_CONFIG=/etc/imattr/imattr.toml \
    IMATTR_ADMIN__LISTEN=0.0.0.0:9464 \
    IMATTR_LOG__FORMAT=json
USER 10001:10001
EXPOSE 9464
# Liveness only: /readyz is 503 while the broker is down or the API refuses the deployment,
# and restarting does not help then (docs/metrics.md).
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD curl -fsS http://127.0.0.1:9464/healthz || exit 1
# SIGTERM flushes within shutdown.timeout_secs (30 s): stop with a longer grace period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["imattr"]
CMD ["run"]
