-- autoembed 0003: model changes without a search gap (new vectors are built in a shadow
-- column beside the old ones, then swapped in), and HNSW indexes built once a backfill is
-- done instead of paying an index insert per row.

ALTER TABLE autoembed.watches
    ADD COLUMN next_model  text REFERENCES autoembed.models (name),
    ADD COLUMN next_dim    integer,
    ADD COLUMN next_attnum smallint,
    -- 'ready': the HNSW index exists (or is not wanted); 'deferred': the worker builds it
    -- (CREATE INDEX CONCURRENTLY) once the watch's backfill is done
    ADD COLUMN index_state text NOT NULL DEFAULT 'ready'
        CHECK (index_state IN ('ready', 'deferred')),
    ADD COLUMN index_note  text;

ALTER TABLE autoembed.jobs DROP CONSTRAINT jobs_lane_check;
ALTER TABLE autoembed.jobs ADD CONSTRAINT jobs_lane_check
    CHECK (lane IN ('embed', 'summary', 'next'));
