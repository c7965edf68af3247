# finserve container image.
#
#   CPU (default target `runtime`):
#     docker build -t finserve:latest .
#     podman build --format docker -t finserve:latest .     # --format docker keeps HEALTHCHECK
#
#   CUDA (target `runtime-cuda`, built with `cargo build --release --features cuda`):
#     docker build --target runtime-cuda -t finserve:cuda \
#         --build-arg CUDA_COMPUTE_CAP=90 .                 # 80 = A100, 89 = L4/4090, 90 = H100/H200
#     docker run --gpus all -p 8080:8080 -e FINSERVE_DEVICE=cuda finserve:cuda
#
# Stages:
#   builder       rust:1-bookworm; dependencies are compiled in their own layer from Cargo.toml +
#                 Cargo.lock and stub sources, so editing src/ only recompiles the finserve crate.
#   demo-model    models/demo/{base,adapter} + README, made world-readable; licence texts and
#                 notices (finserve, every dataset of the demo model) -> /usr/share/licenses/finserve.
#   runtime       debian:bookworm-slim + ca-certificates; non-root; demo model baked in.
#   cuda-builder  nvidia/cuda devel image + the Rust toolchain copied from rust:1-bookworm.
#   runtime-cuda  nvidia/cuda runtime image (cuBLAS, cuRAND, cudart) with the CUDA binary.
# `runtime` is the LAST stage so that a plain `docker build .` produces the CPU image.
#
# Everything is configured through FINSERVE_* environment variables (see deploy/README.md).

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim
# CUDA 13.0.x: candle 0.11's kernels are built with nvcc 13.0 (see deploy/README.md).
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04

# --------------------------------------------------------------------------- shared scripts
FROM ${RUST_IMAGE} AS rust-base
ENV CARGO_TERM_COLOR=never CARGO_NET_RETRY=5
# writes stubs for every build target Cargo.toml declares but the context lacks (see the script)
COPY deploy/docker/cargo-stub-targets /usr/local/bin/cargo-stub-targets

# ---------------------------------------------------------------------------- demo model
# The baked-in default model, made world-readable whatever the modes in the build context are
# (a file written with mode 600 would be unreadable for the non-root runtime user), with its
# README, and /usr/share/licenses/finserve: finserve's licence (Apache-2.0, the text from
# Debian's base-files) and the licence files and notices of every dataset the demo model was
# trained on (Financial PhraseBank: CC BY-NC-SA 3.0, so the model is non-commercial; finance
# tweets: MIT per their card; FinEntity: ODC-BY). deploy/docker/licenses/NOTICE is the overview.
FROM ${RUNTIME_IMAGE} AS demo-model
COPY models/demo/base /opt/finserve/models/demo/base
COPY models/demo/adapter /opt/finserve/models/demo/adapter
COPY models/README.md /opt/finserve/models/demo/README.md
COPY deploy/docker/licenses/ /usr/share/licenses/finserve/
COPY models/README.md /usr/share/licenses/finserve/demo-model/README.md
COPY models/data/financial_phrasebank/License.txt models/data/financial_phrasebank/README.txt \
     models/data/financial_phrasebank/PROVENANCE.md /usr/share/licenses/finserve/financial_phrasebank/
COPY models/data/twitter_financial_news_sentiment/PROVENANCE.md \
     /usr/share/licenses/finserve/twitter_financial_news_sentiment/
COPY models/data/finentity/PROVENANCE.md /usr/share/licenses/finserve/finentity/
RUN cp /usr/share/common-licenses/Apache-2.0 /usr/share/licenses/finserve/LICENSE-Apache-2.0 \
 && chmod -R u=rwX,go=rX /opt/finserve/models /usr/share/licenses/finserve

# ------------------------------------------------------------------------------- builder
FROM rust-base AS builder
WORKDIR /build
# extra cargo features for this CPU build (the CUDA build is the runtime-cuda target)
ARG CARGO_FEATURES=""
# 1) dependency layer: only the manifest and the lock file (re-used until they change)
COPY Cargo.toml Cargo.lock ./
RUN cargo-stub-targets --deps \
 && cargo build --release --locked --bin finserve --features "${CARGO_FEATURES}" \
 && rm -rf src benches tests examples \
    target/release/finserve target/release/deps/finserve-* target/release/deps/libfinserve-* \
    target/release/.fingerprint/finserve-*
# 2) source layer (see .dockerignore for what the context holds)
COPY . .
RUN cargo-stub-targets \
 && find src -type f -exec touch {} + \
 && cargo build --release --locked --bin finserve --features "${CARGO_FEATURES}" \
 && install -D -m 755 target/release/finserve /out/finserve

# -------------------------------------------------------------------------- cuda builder
FROM ${RUST_IMAGE} AS rust-toolchain
FROM ${CUDA_DEVEL_IMAGE} AS cuda-builder
# no GPU is visible during `docker build`: tell candle-kernels which architecture to compile for
ARG CUDA_COMPUTE_CAP=90
# CUDA_HOME + LIBRARY_PATH: link against the toolkit's libcuda stub (soname libcuda.so.1); at
# run time the NVIDIA Container Toolkit mounts the driver's real libcuda.so.1.
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} \
    CUDA_HOME=/usr/local/cuda LIBRARY_PATH=/usr/local/cuda/lib64/stubs \
    RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/cuda/bin:${PATH} \
    CARGO_TERM_COLOR=never CARGO_NET_RETRY=5
RUN apt-get update && apt-get install -y --no-install-recommends \
      ca-certificates gcc g++ make pkg-config git \
 && rm -rf /var/lib/apt/lists/*
COPY --from=rust-toolchain /usr/local/rustup /usr/local/rustup
COPY --from=rust-toolchain /usr/local/cargo /usr/local/cargo
COPY deploy/docker/cargo-stub-targets /usr/local/bin/cargo-stub-targets
WORKDIR /build
COPY Cargo.toml Cargo.lock ./
RUN cargo-stub-targets --deps \
 && cargo build --release --locked --bin finserve --features cuda \
 && rm -rf src benches tests examples \
    target/release/finserve target/release/deps/finserve-* target/release/deps/libfinserve-* \
    target/release/.fingerprint/finserve-*
COPY . .
RUN cargo-stub-targets \
 && find src -type f -exec touch {} + \
 && cargo build --release --locked --bin finserve --features cuda \
 && install -D -m 755 target/release/finserve /out/finserve

# -------------------------------------------------------------------------- runtime-cuda
FROM ${CUDA_RUNTIME_IMAGE} AS runtime-cuda
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 finserve \
 && useradd --system --uid 10001 --gid 10001 --home-dir /opt/finserve --shell /usr/sbin/nologin finserve \
 && mkdir -p /opt/finserve/models/demo /data/hf && chown -R 10001:10001 /data
COPY deploy/docker/finserve-healthcheck /usr/local/bin/finserve-healthcheck
COPY --from=demo-model /opt/finserve/models /opt/finserve/models
COPY --from=demo-model /usr/share/licenses/finserve /usr/share/licenses/finserve
COPY --from=cuda-builder /out/finserve /usr/local/bin/finserve
# OCI annotations. licenses: finserve is Apache-2.0, the bundled demo model CC BY-NC-SA 3.0
# (non-commercial; see /usr/share/licenses/finserve/NOTICE). Pass the build's facts with
#   --build-arg FINSERVE_VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1) \
#   --build-arg FINSERVE_REVISION=$(git rev-parse HEAD) --build-arg FINSERVE_CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
ARG FINSERVE_VERSION=unknown
ARG FINSERVE_REVISION=unknown
ARG FINSERVE_CREATED=unknown
ARG CUDA_RUNTIME_IMAGE
# buildah keys a LABEL layer on its unexpanded text: without a step that reads the arguments, a
# rebuild whose layers above are cached (a commit that changes no byte of the binary) would keep
# the previous build's revision. This RUN depends on their values, and records them in the image.
RUN printf 'version=%s\nrevision=%s\ncreated=%s\n' \
      "${FINSERVE_VERSION}" "${FINSERVE_REVISION}" "${FINSERVE_CREATED}" > /opt/finserve/build-info
LABEL org.opencontainers.image.title="finserve" \
      org.opencontainers.image.description="finserve inference server for mt0/mT5 financial-sentiment models with merged LoRA adapters (CUDA); bundles a non-commercial CC BY-NC-SA 3.0 demo model" \
      org.opencontainers.image.licenses="Apache-2.0 AND CC-BY-NC-SA-3.0" \
      org.opencontainers.image.version="${FINSERVE_VERSION}" \
      org.opencontainers.image.revision="${FINSERVE_REVISION}" \
      org.opencontainers.image.created="${FINSERVE_CREATED}" \
      org.opencontainers.image.base.name="${CUDA_RUNTIME_IMAGE}"
ENV FINSERVE_HOME=/opt/finserve FINSERVE_HOST=0.0.0.0 FINSERVE_PORT=8080 \
    FINSERVE_DEVICE=cuda HF_HOME=/data/hf NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /opt/finserve
VOLUME ["/data"]
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 CMD ["finserve-healthcheck"]
ENTRYPOINT ["/usr/local/bin/finserve"]
CMD ["serve"]

# ------------------------------------------------------------------------------- runtime
FROM ${RUNTIME_IMAGE} AS runtime
# The binary uses rustls (no OpenSSL); ca-certificates is for downloads from the HF Hub.
# The health check is a bash script using /dev/tcp: no curl/wget in the image.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 finserve \
 && useradd --system --uid 10001 --gid 10001 --home-dir /opt/finserve --shell /usr/sbin/nologin finserve \
 && mkdir -p /opt/finserve/models/demo /data/hf && chown -R 10001:10001 /data
COPY deploy/docker/finserve-healthcheck /usr/local/bin/finserve-healthcheck
COPY --from=demo-model /opt/finserve/models /opt/finserve/models
COPY --from=demo-model /usr/share/licenses/finserve /usr/share/licenses/finserve
COPY --from=builder /out/finserve /usr/local/bin/finserve
# OCI annotations. licenses: finserve is Apache-2.0, the bundled demo model CC BY-NC-SA 3.0
# (non-commercial; see /usr/share/licenses/finserve/NOTICE). Pass the build's facts with
#   --build-arg FINSERVE_VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1) \
#   --build-arg FINSERVE_REVISION=$(git rev-parse HEAD) --build-arg FINSERVE_CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
ARG FINSERVE_VERSION=unknown
ARG FINSERVE_REVISION=unknown
ARG FINSERVE_CREATED=unknown
ARG RUNTIME_IMAGE
# buildah keys a LABEL layer on its unexpanded text: without a step that reads the arguments, a
# rebuild whose layers above are cached (a commit that changes no byte of the binary) would keep
# the previous build's revision. This RUN depends on their values, and records them in the image.
RUN printf 'version=%s\nrevision=%s\ncreated=%s\n' \
      "${FINSERVE_VERSION}" "${FINSERVE_REVISION}" "${FINSERVE_CREATED}" > /opt/finserve/build-info
LABEL org.opencontainers.image.title="finserve" \
      org.opencontainers.image.description="finserve inference server for mt0/mT5 financial-sentiment models with merged LoRA adapters (CPU); bundles a non-commercial CC BY-NC-SA 3.0 demo model" \
      org.opencontainers.image.licenses="Apache-2.0 AND CC-BY-NC-SA-3.0" \
      org.opencontainers.image.version="${FINSERVE_VERSION}" \
      org.opencontainers.image.revision="${FINSERVE_REVISION}" \
      org.opencontainers.image.created="${FINSERVE_CREATED}" \
      org.opencontainers.image.base.name="${RUNTIME_IMAGE}"
# FINSERVE_MODEL / FINSERVE_ADAPTER unset = the baked-in demo model under $FINSERVE_HOME.
ENV FINSERVE_HOME=/opt/finserve FINSERVE_HOST=0.0.0.0 FINSERVE_PORT=8080 \
    FINSERVE_DEVICE=cpu HF_HOME=/data/hf
WORKDIR /opt/finserve
# user models, mounted adapters and the Hugging Face cache ($HF_HOME=/data/hf)
VOLUME ["/data"]
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["finserve-healthcheck"]
ENTRYPOINT ["/usr/local/bin/finserve"]
CMD ["serve"]
