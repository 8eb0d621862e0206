# PostgreSQL 17 with pgvector 0.8 from Debian 13's packages, for docker/compose.local.yml.
# (docker-compose.yml uses the public pgvector/pgvector image instead.) The entrypoint
# runs /docker-entrypoint-initdb.d/*.sql on an empty volume, as that image does.
ARG DEBIAN_BASE=debian:trixie-slim
FROM ${DEBIAN_BASE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-17 postgresql-17-pgvector \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /run/postgresql
COPY docker/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
COPY docker/postgres-replica.sh /usr/local/bin/postgres-replica.sh
ENV PATH=/usr/lib/postgresql/17/bin:$PATH PGDATA=/var/lib/postgresql/data
USER postgres
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
