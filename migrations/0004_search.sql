-- autoembed 0004: search people use. A watch may name a jsonb metadata column (filters in
-- the search functions, as LangChain's stores call them), gets a hybrid full-text + vector
-- function (reciprocal rank fusion) with a text-search configuration, and may store its
-- vectors as halfvec.

ALTER TABLE autoembed.watches
    ADD COLUMN metadata_attnum smallint,
    ADD COLUMN fts_config      text NOT NULL DEFAULT 'english',
    ADD COLUMN storage         text NOT NULL DEFAULT 'vector'
        CHECK (storage IN ('vector', 'halfvec'));
