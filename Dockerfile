# syntax=docker/dockerfile:1
# Build stage: a release binary, with dependencies cached in their own layer.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# The workspace's manifests, with empty sources, so the dependencies build
# once; the benchmark member is never built here.
COPY Cargo.toml Cargo.lock build.rs ./
COPY vendor vendor
COPY crates/core/Cargo.toml crates/core/
COPY bench/Cargo.toml bench/
RUN mkdir -p src crates/core/src bench/src \
    && echo 'fn main() {}' > src/main.rs && touch src/lib.rs crates/core/src/lib.rs \
    && echo 'fn main() {}' > bench/src/main.rs \
    && cargo build --release --locked --bin sendgate \
    && rm -rf src crates/core/src
COPY crates crates
COPY src src
COPY migrations migrations
COPY config config
COPY docs/runbook.md docs/runbook.md
RUN touch src/main.rs src/lib.rs crates/core/src/lib.rs \
    && cargo build --release --locked --bin sendgate

# Runtime stage: a small Debian with the binary, run as an unprivileged user.
# sendgate writes no file (logs go to stderr), so the container runs with a
# read-only root filesystem (compose: `read_only: true`).
FROM debian:bookworm-slim
# CA certificates: amqps:// and verify-full Postgres to servers with public
# certificates.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sendgate
COPY --from=build /src/target/release/sendgate /usr/local/bin/sendgate
USER 10001
EXPOSE 9400
ENTRYPOINT ["/usr/local/bin/sendgate"]
CMD ["run"]
