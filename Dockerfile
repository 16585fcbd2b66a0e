# Multi-stage build: a static-ish release binary on a small non-root image.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked && strip target/release/imattr

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home imattr
COPY --from=build /src/target/release/imattr /usr/local/bin/imattr
COPY config/imattr.toml /etc/imattr/imattr.toml
ENV IMATTR_CONFIG=/etc/imattr/imattr.toml
USER 10001
EXPOSE 9464
ENTRYPOINT ["imattr"]
CMD ["run"]
