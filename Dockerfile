# syntax=docker/dockerfile:1
#
# One image for the whole mlsysops control plane. The command picks the service:
#   mlsysops-monitor | mlsysops-analyzer | mlsysops-planner | mlsysops-scheduler |
#   mlsysops-executor, or the CLI `mlsysops` (publish, plans, status, ...).
# Without a command it prints the CLI's help.
#
#   docker build -t REGISTRY/mlsysops:0.1.0 .
#   docker run --rm REGISTRY/mlsysops:0.1.0 mlsysops-planner --help
#
# See docs/deploy.md for building multi-arch images and deploying with Helm.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- build: a virtualenv
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/mlsysops

WORKDIR /src
# The dependencies first, exactly as locked (with hashes; pip and setuptools included):
# a change in the code does not invalidate this layer.
COPY requirements-runtime.txt ./
RUN /opt/mlsysops/bin/pip install --require-hashes -r requirements-runtime.txt
COPY pyproject.toml README.md* LICENSE* ./
COPY mlsysops/ mlsysops/
COPY services/ services/
# A regular (non-editable) install; bytecode is compiled now because the root filesystem
# is read-only at run time. pip and setuptools are not needed at run time: an image
# derived from this one installs extra packages for its plugins with the base image's pip
# (pip --python /opt/mlsysops/bin/python install ...).
RUN /opt/mlsysops/bin/pip install --no-deps --no-build-isolation . \
 && /opt/mlsysops/bin/python -m compileall -q /opt/mlsysops/lib \
 && /opt/mlsysops/bin/python -m pip uninstall -y -q pip setuptools

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="mlsysops" \
      org.opencontainers.image.description="MLSysOps control plane: monitor, analyzer, planner, scheduler, executor on NATS JetStream" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# tini: PID 1 that forwards SIGTERM to the service and reaps zombies.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 mlsysops \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin mlsysops

COPY --from=build /opt/mlsysops /opt/mlsysops

WORKDIR /app
# Shipped plugins and example descriptions (the Helm chart mounts its own plugin
# ConfigMaps over MLSYSOPS_POLICY_DIR / MLSYSOPS_MECHANISM_DIR).
COPY plugins/ /app/plugins/
COPY examples/ /app/examples/

ENV PATH=/opt/mlsysops/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MLSYSOPS_POLICY_DIR=/app/plugins/policies \
    MLSYSOPS_MECHANISM_DIR=/app/plugins/mechanisms

# Numeric user, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

# Default HTTP ports of /metrics, /healthz, /readyz (monitor .. executor); the Helm
# chart sets one port (MLSYSOPS_HTTP_PORT) for all.
EXPOSE 9101 9102 9103 9104 9105

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["mlsysops", "--help"]
