# syntax=docker/dockerfile:1
#
# One image for the five Cohortflow services. The command picks the service:
#   docker run IMAGE gateway | anonymizer | extractor | sorter | exporter | migrate
# Configuration is by COHORTFLOW_* environment variables (shared/settings.py).
# Build:  docker build -t cohortflow:0.1.0 .
# Checked offline by tests/unit/deploy/test_manifests.py (no Docker engine in CI).

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: every dependency and the project itself as wheels ----------------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A compiler for the project's C header reader (setup.py) and for any dependency that ships no
# wheel for this platform; this stage is discarded.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY shared ./shared
COPY services ./services
COPY cohortflow ./cohortflow
# dcm2niix and bids-validator-deno are pip dependencies: their wheels carry the binaries.
RUN pip wheel --wheel-dir /wheels .

# --- runtime: the wheels installed into a slim image, run as a non-root user --------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="cohortflow" \
      org.opencontainers.image.description="Hospital DICOM to de-identified, catalogued, validator-clean BIDS: gateway, anonymizer, extractor, sorter and exporter services" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

# Numeric uid/gid so Kubernetes' runAsNonRoot can verify the user without reading /etc/passwd.
RUN groupadd --system --gid 10001 cohortflow \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/cohortflow --create-home \
        --shell /usr/sbin/nologin cohortflow

# The wheels are bind-mounted from the build stage, so they never become a layer of this image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels cohortflow

# Containers listen on every interface; the gateway serves its API (and /healthz /readyz /metrics)
# on 8000, the stage services serve /healthz /readyz /metrics on 8080. Everything that writes
# (dcm2niix scratch, the Deno cache of bids-validator) writes under /tmp, so the root filesystem
# can be mounted read-only.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/cohortflow \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    DENO_DIR=/tmp/.cache/deno \
    COHORTFLOW_HOME=/tmp/cohortflow \
    COHORTFLOW_GATEWAY_HOST=0.0.0.0 \
    COHORTFLOW_GATEWAY_PORT=8000 \
    COHORTFLOW_SERVICE_HOST=0.0.0.0 \
    COHORTFLOW_SERVICE_PORT=8080 \
    COHORTFLOW_LOG_JSON=true

WORKDIR /home/cohortflow
USER 10001:10001
EXPOSE 8000 8080

# Healthy when this container's service answers /healthz: a stage service on SERVICE_PORT, the
# gateway on GATEWAY_PORT: healthy as soon as either answers 200.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request\ndef up(port):\n    try:\n        with urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4) as r:\n            return r.status == 200\n    except OSError:\n        return False\nports = (os.environ.get('COHORTFLOW_SERVICE_PORT', '8080'), os.environ.get('COHORTFLOW_GATEWAY_PORT', '8000'))\nsys.exit(0 if any(up(p) for p in ports) else 1)"]

ENTRYPOINT ["cohortflow"]
CMD ["gateway"]
