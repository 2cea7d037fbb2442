# syntax=docker/dockerfile:1
#
# subtocall: shared subscriptions for WAMP routers (Crossbar.io).
#
#   docker build -t subtocall .
#   docker run --rm -e WAMP_URL=ws://router:8080/ws -e BACKEND_USERNAME=subtocall \
#     -e BACKEND_SECRET=... -p 8910:8910 subtocall
#
# Configured only through environment variables (`docker run --rm subtocall
# --help` lists them all; doc/configuration.md is the reference). See
# doc/docker.md for what this file was checked with.

ARG RUST_VERSION=1.95.0

# ---- build ---------------------------------------------------------------
# Bookworm, to match the glibc of the distroless Debian 12 runtime below.
FROM rust:${RUST_VERSION}-slim-bookworm AS builder
WORKDIR /src

# Dependencies are cached in BuildKit cache mounts (the crate registry and the
# target directory) rather than in a dependency-only layer: the repository is
# a Cargo workspace, and a dummy-crate layer would have to mirror every
# member's manifest. A source change rebuilds only subtocall itself.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin subtocall \
    && install -D -m 0755 target/release/subtocall /out/subtocall

# ---- runtime -------------------------------------------------------------
# glibc, libgcc and CA certificates (for wss://), no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot

# VERSION follows Cargo.toml (tests/docs.rs checks it); REVISION and CREATED
# are for the build to fill in: --build-arg REVISION="$(git rev-parse HEAD)".
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="subtocall" \
      org.opencontainers.image.description="Shared subscriptions for WAMP routers (Crossbar.io): each event to exactly one backend" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="MIT"

COPY --from=builder /out/subtocall /usr/local/bin/subtocall

# Container defaults that differ from the binary's: one JSON object per log
# line, for log collectors. Override with SUBTOCALL_LOG_FORMAT=text.
# SUBTOCALL_HTTP_ADDR keeps its default 0.0.0.0:8910 (/metrics, /healthz, /readyz).
ENV SUBTOCALL_LOG_FORMAT=json

# distroless's "nonroot" user, numeric so that Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 8910

# SIGTERM drains (up to SUBTOCALL_SHUTDOWN_TIMEOUT, default 10s, plus about 9s
# for GOODBYE and the last answers): give the container a stop timeout of 30s.
STOPSIGNAL SIGTERM

# `subtocall healthcheck` GETs http://127.0.0.1:<port of SUBTOCALL_HTTP_ADDR>/healthz
# and exits 0 or 1 (there is no curl in a distroless image).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/subtocall", "healthcheck"]

ENTRYPOINT ["/usr/local/bin/subtocall"]
