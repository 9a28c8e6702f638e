# convserve server image: ONNX Runtime on CUDA 13 + cuDNN 9 (CPU fallback is automatic), no torch.
# There is no Docker engine on the development machines: this file is linted with hadolint in the
# test suite, not built there. Build: docker build -t convserve:0.1.0 .
# CPU-only image: docker build --build-arg BASE=ubuntu:24.04 -t convserve:0.1.0-cpu .
ARG BASE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# Stage 1: the convserve wheel (the bundled demo repository is package data inside it).
FROM python:3.12-slim-bookworm AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY export ./export
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# Stage 2: the runtime: Python, the server's runtime dependencies, a non-root user.
FROM ${BASE}
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/convserve \
    PATH=/opt/convserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=wheel /wheels /wheels
# The `gpu` extra adds NVML for the GPU gauges; onnxruntime-gpu comes with the base install.
# DL3013: the wheel is this source tree; its dependencies are pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN python3 -m venv "$VIRTUAL_ENV" \
    && WHEEL="$(ls /wheels/convserve-*.whl)" \
    && pip install --no-cache-dir "${WHEEL}[gpu]" \
    && rm -rf /wheels
# The demo repository, also outside the package, for an init container to copy into a volume.
COPY service/model_repository /opt/convserve-demo-models
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin convserve
USER 10001:10001
ENV CONVSERVE_HOST=0.0.0.0 \
    CONVSERVE_GRPC_PORT=8001 \
    CONVSERVE_METRICS_PORT=8002 \
    CONVSERVE_LOG_FORMAT=json
EXPOSE 8001 8002
STOPSIGNAL SIGTERM
ENTRYPOINT ["convserve"]
CMD ["serve"]
