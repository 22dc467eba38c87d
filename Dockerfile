# syntax=docker/dockerfile:1.7
# fondation-worker image for Scaleway Serverless Containers (BuildKit required: the
# private Fondation CLI token is a build secret, never a build arg or a layer). Serverless
# Containers run linux/amd64 only: always build for that platform, also on an arm64 laptop.
#
#   docker buildx build --platform linux/amd64 -t IMAGE .              # simulator CLI
#   FONDATION_TOKEN=... docker buildx build --platform linux/amd64 \
#     --build-arg FONDATION_PACKAGE='fondation==1.4.2' \
#     --build-arg FONDATION_INDEX_URL=https://pypi.example.com/simple \
#     --secret id=fondation_token,env=FONDATION_TOKEN -t IMAGE .       # real CLI
#
# Without FONDATION_PACKAGE the image runs the bundled simulator and FONDATION_COMMAND says so.
#
# Layers, slowest-changing first, so a code change rebuilds only the last one: the Fondation
# CLI (its own venv), the worker's locked dependencies (deploy/requirements-image.txt), then
# the application with --no-deps. pip's cache is a BuildKit cache mount, never a layer.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# pip requirement for the real Fondation CLI (name==version, or a git+https URL); empty = simulator
ARG FONDATION_PACKAGE=""

FROM ${PYTHON_IMAGE} AS builder
ARG FONDATION_PACKAGE
# Optional private index URL (no credentials in it), and the host and login the secret is for
# (host defaults to the index URL's host).
ARG FONDATION_INDEX_URL=""
ARG FONDATION_INDEX_HOST=""
ARG FONDATION_INDEX_LOGIN="__token__"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# git is needed at build time only for git+https FONDATION_PACKAGE specs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git=1:2.39.* \
    && rm -rf /var/lib/apt/lists/*
# 1. The Fondation CLI, in a venv of its own: its dependencies cannot move the worker's.
# The token is read from the BuildKit secret into a netrc on a tmpfs: it exists only while this
# RUN executes and is never written to an image layer (nor to the pip cache: pip caches
# downloads, never credentials). pip (requests) and git both read .netrc.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=fondation_token,required=false \
    --mount=type=tmpfs,target=/run/fondation-auth \
    set -eu; \
    mkdir -p /opt/cli/bin; \
    if [ -z "${FONDATION_PACKAGE}" ]; then \
        echo "FONDATION_PACKAGE is empty: the image will run fondation-simulator"; \
        exit 0; \
    fi; \
    python -m venv /opt/cli; \
    if [ -s /run/secrets/fondation_token ]; then \
        host="${FONDATION_INDEX_HOST:-$(echo "${FONDATION_INDEX_URL}" | sed -E 's#^[a-z+]+://([^/:]+).*#\1#')}"; \
        if [ -z "${host}" ]; then echo "set FONDATION_INDEX_HOST or FONDATION_INDEX_URL" >&2; exit 1; fi; \
        umask 077; \
        printf 'machine %s login %s password %s\n' "${host}" "${FONDATION_INDEX_LOGIN}" \
            "$(cat /run/secrets/fondation_token)" > /run/fondation-auth/.netrc; \
    fi; \
    export NETRC=/run/fondation-auth/.netrc; \
    if [ -n "${FONDATION_INDEX_URL}" ]; then export PIP_EXTRA_INDEX_URL="${FONDATION_INDEX_URL}"; fi; \
    printf '%s\n' "${FONDATION_PACKAGE}" > /run/fondation-auth/requirements.txt; \
    HOME=/run/fondation-auth /opt/cli/bin/pip install --cache-dir /root/.cache/pip \
        --requirement /run/fondation-auth/requirements.txt; \
    test -x /opt/cli/bin/fondation \
        || { echo "FONDATION_PACKAGE installed no 'fondation' executable" >&2; exit 1; }
# 2. The worker's runtime dependencies, locked (no scaleway SDK: deploy-time only).
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY deploy/requirements-image.txt ./
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --requirement requirements-image.txt
# 3. The application, last: a code change rebuilds only this layer.
COPY pyproject.toml README.md ./
COPY app ./app
RUN pip install --no-cache-dir --no-deps . \
    && pip check

FROM ${PYTHON_IMAGE} AS runtime-base
# git clones the job repositories at run time; tini is PID 1 (below).
RUN apt-get update \
    && apt-get install -y --no-install-recommends git=1:2.39.* tini=0.19.* \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app app \
    && mkdir -p /data/work /data/tmp \
    && chown -R app:app /data
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/cli /opt/cli
# /data is the container's local storage (local_storage_limit), not /tmp: on sandbox v2 /tmp is
# RAM and would count against the memory limit. Clones and CLI output go to WORK_DIR.
# HOST: the worker's default is 127.0.0.1 (safe for `make run`); in the container it must
# listen on every interface for Scaleway's router to reach it.
# /opt/cli/bin comes last on PATH: it adds `fondation`, and never shadows the worker's python.
ENV PATH=/opt/venv/bin:$PATH:/opt/cli/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DATA_DIR=/data \
    WORK_DIR=/data/work \
    TMPDIR=/data/tmp \
    HOME=/home/app \
    HOST=0.0.0.0 \
    PORT=8080
WORKDIR /data
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8080'), timeout=4)"]
# PID 1 is tini, not Python: it forwards SIGTERM to the worker (which drains) and reaps
# every orphan that ends up reparented to PID 1, so no zombie piles up across jobs.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["fondation-worker", "serve"]

# Two flavours differ only in FONDATION_COMMAND; the final stage picks one from FONDATION_PACKAGE.
FROM runtime-base AS runtime
ENV FONDATION_COMMAND="fondation-simulator analyze {repo_dir} --output-dir {output_dir} --profile production"

FROM runtime-base AS runtime-real
ENV FONDATION_COMMAND="fondation analyze {repo_dir} --output-dir {output_dir} --profile production"

# "runtime" when FONDATION_PACKAGE is empty, "runtime-real" when it is set. DL3006 (untagged
# image) is a false positive here: this names one of the local stages above, not an image.
# hadolint ignore=DL3006
FROM runtime${FONDATION_PACKAGE:+-real} AS final
