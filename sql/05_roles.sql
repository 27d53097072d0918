-- Repeatable: re-applied by every `autoembed migrate`.
--
-- Two NOLOGIN roles (cluster-wide, shared by every database that autoembed migrates):
--   autoembed_definer  owns the SECURITY DEFINER functions (the queue triggers, enqueue). It
--                      may queue jobs and read watches, nothing else: a mistake in definer
--                      code cannot reach more than the queue.
--   autoembed_workers  the group a worker role joins (autoembed.grant_worker(role)): the
--                      queue, the watches, and EXECUTE on each watch's accessor functions.
DO $roles$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['autoembed_definer', 'autoembed_workers'] LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION
                WHEN duplicate_object OR unique_violation THEN
                    NULL;  -- another database's migration created it meanwhile
                WHEN insufficient_privilege THEN
                    RAISE EXCEPTION 'autoembed: cannot create role %: % needs CREATEROLE (or superuser) to migrate', r, current_user
                        USING HINT = 'Run `autoembed migrate` as a superuser or a role with CREATEROLE, or create the NOLOGIN roles autoembed_definer and autoembed_workers first.',
                              ERRCODE = 'insufficient_privilege';
            END;
        END IF;
        -- the migrating role must be able to hand objects to the definer role
        IF r = 'autoembed_definer' AND NOT pg_catalog.pg_has_role(current_user, r, 'MEMBER') THEN
            EXECUTE pg_catalog.format('GRANT %I TO %I', r, current_user);
        END IF;
    END LOOP;
END
$roles$;
