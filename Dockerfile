# convserve server image: ONNX Runtime (CUDA 13 + cuDNN 9 when the base has them), no torch.
# Not built on the development machines (no Docker engine there); linted with hadolint.
ARG BASE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

FROM python:3.11-slim-bookworm AS wheels
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY export ./export
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${BASE}
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/convserve PATH=/opt/convserve/bin:$PATH PYTHONUNBUFFERED=1
COPY --from=wheels /wheels /wheels
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels
RUN useradd --system --uid 10001 --no-create-home convserve
USER 10001
EXPOSE 8001 8002
STOPSIGNAL SIGTERM
ENTRYPOINT ["convserve"]
CMD ["serve"]
