# syntax=docker/dockerfile:1
# The kiabatch image: the CLI (entrypoint), the claim/report steps pods run, and the
# worker programs in workers/ (on PATH). No compilers, a non-root user, and it runs with
# a read-only root filesystem (Kubernetes mounts an emptyDir at /tmp).
#
#   docker build -t registry.example.com/kiabatch:0.1.0 .
#   docker build --build-arg PYTHON_IMAGE=python:3.13-slim-bookworm -t ... .
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# Compilers live only in this stage, in case a dependency has no wheel for the platform.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential libgmp-dev libmpfr-dev libmpc-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kiabatch ./kiabatch
COPY workers ./workers
# Byte-compile now: at run time the root filesystem is read-only.
RUN pip install . && python -m compileall -q /opt/venv

FROM ${PYTHON_IMAGE}
ARG UID=65532
RUN groupadd --system --gid "${UID}" kiabatch \
    && useradd --system --uid "${UID}" --gid "${UID}" --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin kiabatch
COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 workers /opt/kiabatch/workers
ENV PATH=/opt/kiabatch/workers:/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER ${UID}:${UID}
WORKDIR /tmp
ENTRYPOINT ["kiabatch"]
CMD ["--help"]
