-- autoembed: the queue, the watches and the models they use.
-- Versioned: applied once, recorded with its checksum in autoembed.schema_migrations.
-- Functions, trigger functions and views live in sql/ and are re-applied on every migrate.

CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE autoembed.models (
    name          text PRIMARY KEY,
    dim           integer NOT NULL CHECK (dim BETWEEN 1 AND 16000),
    max_tokens    integer CHECK (max_tokens > 0),
    description   text,
    registered_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO autoembed.models (name, dim, max_tokens, description) VALUES
    ('gte-small', 384, 512, 'thenlper/gte-small as Supabase ships it'),
    ('all-minilm-l6-v2', 384, 256, 'sentence-transformers/all-MiniLM-L6-v2'),
    ('bge-small-en-v1.5', 384, 512, 'BAAI/bge-small-en-v1.5');

CREATE TABLE autoembed.watches (
    id               integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source           regclass NOT NULL,
    pk_column        name NOT NULL,
    pk_type          text NOT NULL,
    content_column   name NOT NULL,
    embedding_column name NOT NULL,
    model            text NOT NULL REFERENCES autoembed.models (name),
    dim              integer NOT NULL,
    match_function   regprocedure,
    summary_column   name,
    llm_model        text,
    llm_prompt       text,
    llm_options      jsonb NOT NULL DEFAULT '{}',
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source, embedding_column)
);

-- One row per (watch, lane, row of the source table): a row changed many times before the
-- worker gets to it is embedded once. `generation` counts changes, so a worker that embedded
-- an older text can tell that its job was queued again meanwhile.
CREATE TABLE autoembed.jobs (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    watch_id     integer NOT NULL REFERENCES autoembed.watches (id) ON DELETE CASCADE,
    lane         text NOT NULL DEFAULT 'embed' CHECK (lane IN ('embed', 'summary')),
    pk           text NOT NULL,
    status       text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'running', 'failed')),
    generation   integer NOT NULL DEFAULT 1,
    attempts     integer NOT NULL DEFAULT 0,
    run_after    timestamptz NOT NULL DEFAULT now(),
    leased_until timestamptz,
    worker       text,
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (watch_id, lane, pk)
);

-- dequeue: the pending jobs of a lane whose time has come, oldest first
CREATE INDEX jobs_claim_idx ON autoembed.jobs (lane, run_after, id) WHERE status = 'pending';
-- lease expiry: running jobs whose worker stopped renewing
CREATE INDEX jobs_lease_idx ON autoembed.jobs (leased_until) WHERE status = 'running';
CREATE INDEX jobs_failed_idx ON autoembed.jobs (watch_id) WHERE status = 'failed';

-- rows finished per batch, for the recent throughput in autoembed.status (pruned by workers)
CREATE TABLE autoembed.throughput (
    watch_id    integer NOT NULL REFERENCES autoembed.watches (id) ON DELETE CASCADE,
    lane        text NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT now(),
    rows        integer NOT NULL
);
CREATE INDEX throughput_finished_idx ON autoembed.throughput (finished_at);
