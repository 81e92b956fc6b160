# Multi-stage build: a release binary on a small non-root runtime image.
#   docker build -t breakwater .        (or buildah: loadtests/image-test.sh builds without a daemon)
#   docker run --read-only -v $PWD/config:/app/config:ro -v bw-var:/app/var \
#     -p 8080:8080 -p 9901:9901 breakwater
#
# Base images are pinned by digest (the tag is kept for people; the digest decides what is
# pulled). This machine reaches no registry, so the digests were not read with `crane digest`
# here: they are the multi-arch index digests that several unrelated public projects pin for
# these exact tags. Re-check them where a registry is reachable before a release build, e.g.
#   crane digest rust:1.95.0-bookworm
#   crane digest gcr.io/distroless/cc-debian12:nonroot
# and let Renovate or Dependabot keep them current (both understand image:tag@sha256:...).
# tests/kubernetes.rs fails if a FROM line loses its digest.
FROM rust:1.95.0-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1 AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY loadtests ./loadtests
COPY config ./config
# The decision log and spool directories are breakwater's alone (0700; files in them are 0600).
RUN cargo build --release --locked --bin breakwater \
    && install -d -m 0700 -o 65532 -g 65532 /out/var /out/var/audit /out/var/spool

FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f
# Relative paths in the config (body files, var/audit, var/spool) resolve from /app.
WORKDIR /app
COPY --from=build /src/target/release/breakwater /usr/local/bin/breakwater
# The config directory is the documented mount point: /app/config (read-only is fine).
COPY --from=build /src/config /app/config
# Decision log and DLQ spool: the only place breakwater writes, so the root filesystem can be
# read-only (Kubernetes readOnlyRootFilesystem, docker run --read-only). Mount a persistent
# or generic ephemeral volume here in production (config/kubernetes/).
COPY --from=build --chown=65532:65532 /out/var /app/var
ENV BREAKWATER_CONFIG=/app/config/breakwater.toml
# The shipped example HMAC key is public: the image refuses to start with it (a local
# `cargo run` only warns). Mount your own config and key.
ENV BREAKWATER_REFUSE_EXAMPLE_KEY=1
# Numeric: Kubernetes runAsNonRoot cannot verify a user name, only a uid (distroless's
# `nonroot` is 65532).
USER 65532:65532
# 8080: data plane (Magento calls this). 9901: admin API and /metrics.
# As a sidecar, Magento reaches breakwater on localhost inside the pod; to publish the ports
# from a standalone container, set server.listen / admin_listen to 0.0.0.0 in the mounted config.
EXPOSE 8080 9901
ENTRYPOINT ["/usr/local/bin/breakwater"]
