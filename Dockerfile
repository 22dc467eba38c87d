# syntax=docker/dockerfile:1.7
# fondation-worker image for Scaleway Serverless Containers (BuildKit required: the
# private Fondation CLI token is a build secret, never a build arg or a layer).
#
#   docker buildx build -t IMAGE .                                     # simulator CLI
#   FONDATION_TOKEN=... docker buildx build \
#     --build-arg FONDATION_PACKAGE='fondation==1.4.2' \
#     --build-arg FONDATION_INDEX_URL=https://pypi.example.com/simple \
#     --secret id=fondation_token,env=FONDATION_TOKEN -t IMAGE .       # real CLI
#
# Without FONDATION_PACKAGE the image runs the bundled simulator and FONDATION_COMMAND says so.

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
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# git is needed at build time only for git+https FONDATION_PACKAGE specs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git=1:2.39.* \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md* ./
COPY app ./app
RUN pip install --no-cache-dir .
# The token is read from the BuildKit secret into a netrc on a tmpfs: it exists only while this
# RUN executes and is never written to an image layer. pip (requests) and git both read .netrc.
RUN --mount=type=secret,id=fondation_token,required=false \
    --mount=type=tmpfs,target=/run/fondation-auth \
    set -eu; \
    if [ -z "${FONDATION_PACKAGE}" ]; then \
        echo "FONDATION_PACKAGE is empty: the image will run fondation-simulator"; \
        exit 0; \
    fi; \
    if [ -s /run/secrets/fondation_token ]; then \
        host="${FONDATION_INDEX_HOST:-$(echo "${FONDATION_INDEX_URL}" | sed -E 's#^[a-z+]+://([^/:]+).*#\1#')}"; \
        if [ -z "${host}" ]; then echo "set FONDATION_INDEX_HOST or FONDATION_INDEX_URL" >&2; exit 1; fi; \
        umask 077; \
        printf 'machine %s login %s password %s\n' "${host}" "${FONDATION_INDEX_LOGIN}" \
            "$(cat /run/secrets/fondation_token)" > /run/fondation-auth/.netrc; \
    fi; \
    export HOME=/run/fondation-auth NETRC=/run/fondation-auth/.netrc; \
    if [ -n "${FONDATION_INDEX_URL}" ]; then export PIP_EXTRA_INDEX_URL="${FONDATION_INDEX_URL}"; fi; \
    printf '%s\n' "${FONDATION_PACKAGE}" > /run/fondation-auth/requirements.txt; \
    pip install --no-cache-dir --requirement /run/fondation-auth/requirements.txt; \
    command -v fondation > /dev/null \
        || { echo "FONDATION_PACKAGE installed no 'fondation' executable" >&2; exit 1; }

FROM ${PYTHON_IMAGE} AS runtime-base
# git clones the job repositories at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git=1:2.39.* \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app app \
    && mkdir -p /data/work /data/tmp \
    && chown -R app:app /data
COPY --from=builder /opt/venv /opt/venv
# /data is the container's local storage (local_storage_limit), not /tmp: on sandbox v2 /tmp is
# RAM and would count against the memory limit. Clones and CLI output go to WORK_DIR.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DATA_DIR=/data \
    WORK_DIR=/data/work \
    TMPDIR=/data/tmp \
    HOME=/home/app \
    PORT=8080
WORKDIR /data
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8080'), timeout=4)"]
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
