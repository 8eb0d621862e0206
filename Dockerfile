# One image for the API and the workers. CPU (default) or CUDA:
#   docker build -t latentbank .
#   docker build -t latentbank:cuda --build-arg VARIANT=cuda .
ARG VARIANT=cpu
FROM python:3.11-slim AS base-cpu
ENV TORCH_SPEC="torch==2.13.0" TORCH_INDEX="https://download.pytorch.org/whl/cpu"

FROM nvidia/cuda:12.8.0-runtime-ubuntu24.04 AS base-cuda
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3-pip \
    && rm -rf /var/lib/apt/lists/* && ln -sf /usr/bin/python3.11 /usr/local/bin/python
ENV TORCH_SPEC="torch>=2.10" TORCH_INDEX="https://download.pytorch.org/whl/cu128"

FROM base-${VARIANT}
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY models models
COPY workers workers
COPY service service
COPY store store
COPY migrations migrations
# torch first, from the variant's index, so the project's "torch>=2.10" is already met.
RUN python -m pip install --no-cache-dir --index-url "$TORCH_INDEX" "$TORCH_SPEC" \
    && python -m pip install --no-cache-dir '.[s3]'
ENV LATENTBANK_DATA_DIR=/data PYTHONUNBUFFERED=1
USER 1000:1000
CMD ["latentbank", "--help"]
