# graphinfer worker, gateway and CLI. Every setting comes from the
# environment; no secret is built into the image.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system graphinfer && useradd --system --gid graphinfer --home-dir /app --shell /usr/sbin/nologin graphinfer

WORKDIR /app
COPY pyproject.toml README.md ./
COPY graphinfer ./graphinfer
RUN pip install . && chown -R graphinfer:graphinfer /app

# The model repository is mounted here, read-only for the service.
VOLUME ["/models"]
ENV GRAPHINFER_MODEL_REPOSITORY=/models \
    GRAPHINFER_GATEWAY_HOST=0.0.0.0

USER graphinfer
ENTRYPOINT ["graphinfer"]
CMD ["worker"]
