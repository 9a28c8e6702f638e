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
COPY model_format ./model_format
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
# The dependencies first, in a layer that only a change to pyproject.toml rebuilds (onnxruntime-gpu
# alone is hundreds of MB), read from its [project] table; the `gpu` extra adds NVML for the GPU
# gauges. Then the wheel itself, without them, which every source change rebuilds.
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -m venv "$VIRTUAL_ENV" \
    && python3 -c "import tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['gpu']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/pyproject.toml /tmp/requirements.txt
COPY --from=wheel /wheels /wheels
# DL3013: the wheel is this source tree; its dependencies are pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-deps /wheels/convserve-*.whl \
    && rm -rf /wheels
# The demo repository, also outside the package, for an init container to copy into a volume.
COPY service/model_repository /opt/convserve-demo-models
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin convserve
USER 10001:10001
ENV CONVSERVE_HOST=0.0.0.0 \
    CONVSERVE_HTTP_PORT=8000 \
    CONVSERVE_GRPC_PORT=8001 \
    CONVSERVE_METRICS_PORT=8002 \
    CONVSERVE_LOG_FORMAT=json
EXPOSE 8000 8001 8002
STOPSIGNAL SIGTERM
ENTRYPOINT ["convserve"]
CMD ["serve"]
