#!/bin/sh
# A hot standby of the `postgres` service: on an empty volume, a copy of the primary by
# pg_basebackup as the `replicator` role (docker/postgres-replication.sh made it), with
# standby.signal and primary_conninfo; then the server, streaming from the primary and
# answering reads (hot_standby_feedback keeps the rows a long search or export reads from
# being vacuumed away under it on the primary). Arguments go to postgres (e.g. -p 55433).
set -eu
: "${PRIMARY_HOST:?set PRIMARY_HOST}" "${PRIMARY_PORT:=5432}"
: "${REPLICATION_PASSWORD:?set REPLICATION_PASSWORD (see the top of docker-compose.yml)}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    conninfo="host=$PRIMARY_HOST port=$PRIMARY_PORT user=replicator password=$REPLICATION_PASSWORD application_name=$(hostname)"
    until pg_basebackup -D "$PGDATA" -d "$conninfo" -X stream -c fast -R -w; do
        echo "postgres-replica: the primary is not ready for a base backup; again in 2 s"
        find "$PGDATA" -mindepth 1 -delete
        sleep 2
    done
    printf "primary_conninfo = '%s'\n" "$conninfo" >> "$PGDATA/postgresql.auto.conf"
    chmod 700 "$PGDATA"
fi
exec postgres -D "$PGDATA" -c hot_standby=on -c hot_standby_feedback=on "$@"
