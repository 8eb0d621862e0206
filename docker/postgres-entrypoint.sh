#!/bin/sh
# First start: a cluster whose superuser is $POSTGRES_USER (password $POSTGRES_PASSWORD,
# required; scram over TCP) with a database $POSTGRES_DB, then the scripts of
# /docker-entrypoint-initdb.d/*.sql (and *.sh) run in it as the superuser (as the official image
# does: docker/postgres-init.sql makes the application's role), on a server that listens
# on its Unix socket only. Then the server, in the foreground, with any arguments given
# (e.g. -p 55432 -c listen_addresses=127.0.0.1).
set -eu
: "${POSTGRES_USER:=postgres}" "${POSTGRES_DB:=latentbank}"
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" --auth-local=trust \
        --auth-host=scram-sha-256 --encoding=UTF8 >/dev/null
    rm -f "$pwfile"
    echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
    pg_ctl -D "$PGDATA" -w -s -o "-c listen_addresses='' -k /run/postgresql" start
    psql="psql -v ON_ERROR_STOP=1 --no-psqlrc -q -h /run/postgresql -U $POSTGRES_USER"
    echo "CREATE DATABASE \"$POSTGRES_DB\"" | $psql -d postgres
    for script in /docker-entrypoint-initdb.d/*; do
        case "$script" in
            *.sql) echo "postgres-entrypoint: running $script"
                   $psql -d "$POSTGRES_DB" -f "$script" ;;
            *.sh) echo "postgres-entrypoint: running $script"
                  PGHOST=/run/postgresql sh "$script" ;;
        esac
    done
    pg_ctl -D "$PGDATA" -w -s -m fast stop
fi
exec postgres -D "$PGDATA" "$@"
