# Redis from Debian 13's packages, for docker/compose.local.yml (docker-compose.yml uses
# the public redis image). The compose file gives the flags: AOF, no eviction.
ARG DEBIAN_BASE=debian:trixie-slim
FROM ${DEBIAN_BASE}
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* && mkdir -p /data && chown redis:redis /data
USER redis
WORKDIR /data
CMD ["redis-server", "--appendonly", "yes", "--maxmemory-policy", "noeviction"]
