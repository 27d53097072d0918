-- autoembed 0005: chunked watches. A long text is cut into passages that fit the model
-- (by the worker, in the model's own tokens) and each passage gets its vector in a chunk
-- table next to the source table; only passages whose text changed are embedded again.

ALTER TABLE autoembed.watches
    ADD COLUMN chunking         jsonb,  -- NULL: not chunked; else the options (tokens...)
    ADD COLUMN chunk_table      regclass,
    ADD COLUMN next_chunk_table regclass;  -- a model change builds its passages here
