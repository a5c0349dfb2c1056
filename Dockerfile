# syntax=docker/dockerfile:1
# weir's container image: the `weir` binary (router, simulator, bench: the same crate and features CI builds and tests
# with ./scripts/test), built in a Rust image and copied into a distroless runtime that runs as non-root.
# Build: docker build -t weir:0.1.0 .        (the manifests in deploy/ reference image `weir`, tag 0.1.0)
# Nothing here was built on the development machines (they have no container engine): see deploy/README.md.

# ---- build ------------------------------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS build
WORKDIR /src
# The whole workspace (see .dockerignore); the registry and target caches keep rebuilds incremental.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p weir --bin weir \
 && install -D -m 0755 target/release/weir /out/weir

# ---- runtime ----------------------------------------------------------------------------------------------------
# glibc (the binary links it and jemalloc), CA certificates, no shell, no package manager; uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/weir /usr/local/bin/weir
# Read-only root filesystem friendly: weir writes nothing to disk in `serve` or `sim`.
USER 65532:65532
EXPOSE 8080 8000
ENTRYPOINT ["/usr/local/bin/weir"]
CMD ["serve", "--listen", "0.0.0.0:8080"]
