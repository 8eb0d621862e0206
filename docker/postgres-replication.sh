# The database's first start (run once, on an empty volume, after postgres-init.sql, by
# both images' entrypoints): with REPLICATION_PASSWORD set, a role `replicator` that may
# stream the WAL (REPLICATION, nothing else) and a pg_hba.conf line letting it in with a
# SCRAM password, for the `postgres-replica` service (docker/postgres-replica.sh). Without
# it, nothing. No `set` or `exit` here: the public image sources this file.
if [ -n "${REPLICATION_PASSWORD:-}" ]; then
    psql -v ON_ERROR_STOP=1 --no-psqlrc -q -U "${POSTGRES_USER:-postgres}" -d postgres \
        -v pw="$REPLICATION_PASSWORD" <<'SQL'
SET password_encryption = 'scram-sha-256';
CREATE ROLE replicator LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'pw';
SQL
    echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    echo "postgres-replication: role replicator may stream the WAL"
fi
