# One image with every binary of the workspace, built with the same cargo
# command CI runs (see .ci/run and the README's test command).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --workspace --bins

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/debug/order /src/target/debug/inventory /src/target/debug/shipping /src/target/debug/notification /src/target/debug/sagactl /src/target/debug/demo /usr/local/bin/
