-- Repeatable: re-applied by every `autoembed migrate`.

-- The schema pgvector lives in (public on a plain server, extensions on Supabase). Every
-- reference to its type and operators is qualified with it, so nothing depends on the
-- caller's search_path.
CREATE OR REPLACE FUNCTION autoembed.vector_schema()
RETURNS name
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT n.nspname
      FROM pg_extension e
      JOIN pg_namespace n ON n.oid = e.extnamespace
     WHERE e.extname = 'vector'
$$;

CREATE OR REPLACE FUNCTION autoembed.vector_type(dim integer)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('%I.vector(%s)', autoembed.vector_schema(), dim)
$$;

-- The lanes a watch queues work on: always 'embed', and 'summary' when it has a summary column.
CREATE OR REPLACE FUNCTION autoembed.lanes(summary_column name)
RETURNS text[]
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE WHEN summary_column IS NULL THEN ARRAY['embed'] ELSE ARRAY['embed', 'summary'] END
$$;

-- Register (or update) a model that is not in the registry, e.g. a model directory.
CREATE OR REPLACE FUNCTION autoembed.register_model(
    model_name text,
    dim integer,
    max_tokens integer DEFAULT NULL,
    description text DEFAULT NULL
)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    known autoembed.models%ROWTYPE;
BEGIN
    SELECT * INTO known FROM autoembed.models m WHERE m.name = model_name;
    IF FOUND AND known.dim <> dim THEN
        RAISE EXCEPTION 'autoembed: model "%" is registered with % dimensions, not %',
            model_name, known.dim, dim
            USING HINT = 'Give the model directory another name, or unwatch the tables that use it first.',
                  ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO autoembed.models AS m (name, dim, max_tokens, description)
    VALUES (model_name, dim, max_tokens, description)
    ON CONFLICT (name) DO UPDATE
        SET max_tokens = EXCLUDED.max_tokens,
            description = coalesce(EXCLUDED.description, m.description);
END
$$;
