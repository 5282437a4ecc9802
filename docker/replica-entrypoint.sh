#!/bin/bash
# Entrypoint of the streaming replica in docker-compose.yml (official postgres image, run as
# root): on first start, clone the primary with pg_basebackup (-R writes standby.signal and
# primary_conninfo), then run postgres as a hot standby. Later starts reuse the data directory.
set -euo pipefail

: "${PGDATA:=/var/lib/postgresql/data}"
: "${PRIMARY_HOST:?set PRIMARY_HOST}"
: "${PRIMARY_PORT:=5432}"
: "${REPLICATION_USER:=replicator}"
: "${REPLICATION_PASSWORD:?set REPLICATION_PASSWORD}"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    chmod 0700 "$PGDATA"
    until gosu postgres pg_isready -q -h "$PRIMARY_HOST" -p "$PRIMARY_PORT"; do
        echo "replica: waiting for the primary at $PRIMARY_HOST:$PRIMARY_PORT"
        sleep 1
    done
    echo "replica: cloning the primary"
    gosu postgres pg_basebackup \
        --dbname="host=$PRIMARY_HOST port=$PRIMARY_PORT user=$REPLICATION_USER password=$REPLICATION_PASSWORD" \
        --pgdata="$PGDATA" --write-recovery-conf --wal-method=stream --checkpoint=fast \
        --progress
fi

exec gosu postgres postgres -D "$PGDATA" -c hot_standby=on "$@"
