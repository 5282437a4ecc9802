#!/bin/bash
# Runs once, when the official postgres image initialises an empty data directory
# (/docker-entrypoint-initdb.d): a role for streaming replication, allowed in pg_hba.conf.
set -euo pipefail

: "${REPLICATION_USER:=replicator}"
: "${REPLICATION_PASSWORD:?set REPLICATION_PASSWORD}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v user="$REPLICATION_USER" -v password="$REPLICATION_PASSWORD" <<'SQL'
CREATE ROLE :"user" WITH REPLICATION LOGIN PASSWORD :'password';
SQL

# The image's pg_hba.conf ends with "host all all all scram-sha-256", which does not cover
# replication connections.
echo "host replication ${REPLICATION_USER} all scram-sha-256" >>"$PGDATA/pg_hba.conf"
