# One image with the workspace's binaries: a release build, from the
# committed Cargo.lock (--locked), run as an unprivileged user.
FROM rust:1.95.0-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --workspace --bins

FROM debian:12.12-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin saga
COPY --from=build /src/target/release/order /src/target/release/inventory /src/target/release/shipping /src/target/release/notification /src/target/release/sagactl /src/target/release/demo /src/target/release/console /usr/local/bin/
USER 10001:10001
