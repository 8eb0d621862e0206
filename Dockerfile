# One image for the API and the workers. CPU (default) or CUDA:
#   docker build -t latentbank:cpu .
#   docker build -t latentbank:cuda --build-arg VARIANT=cuda .
ARG VARIANT=cpu

FROM python:3.11-slim AS base-cpu
ENV TORCH_SPEC="torch==2.13.0" TORCH_INDEX="https://download.pytorch.org/whl/cpu"
RUN python -m venv /opt/venv

FROM nvidia/cuda:12.8.0-runtime-ubuntu24.04 AS base-cuda
# Ubuntu 24.04's Python is 3.12; a virtual environment keeps pip off the system's packages.
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
ENV TORCH_SPEC="torch>=2.10" TORCH_INDEX="https://download.pytorch.org/whl/cu128"

FROM base-${VARIANT}
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 LATENTBANK_DATA_DIR=/data
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY models models
COPY workers workers
COPY service service
COPY store store
COPY migrations migrations
# torch first, from the variant's index, so the project's "torch>=2.10" is already met.
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" "$TORCH_SPEC" \
    && pip install --no-cache-dir '.[s3]' \
    && mkdir -p /data && chown 1000:1000 /data
USER 1000:1000
EXPOSE 8000
CMD ["latentbank", "--help"]
