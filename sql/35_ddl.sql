-- Repeatable: re-applied by every `autoembed migrate`.
--
-- Event triggers keep watches in step with their tables' schema: a renamed column or a
-- changed key type re-creates the watch's search function and accessors; a dropped table
-- takes its watches (and their queued work and functions) with it. They never make the
-- user's DDL fail: a failure is a WARNING, and `autoembed status` shows the watch's problem.
-- A change that stops a watch (a dropped or retyped column it reads) is a WARNING too, to
-- whoever made it, at once.
-- Creating event triggers needs a superuser; without one, migrate says so and the worker
-- and `autoembed status` still detect the same problems (autoembed.watch_problem).

CREATE OR REPLACE FUNCTION autoembed.on_ddl_end()
RETURNS event_trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    w autoembed.watches%ROWTYPE;
    problem text;
BEGIN
    IF current_setting('autoembed.in_ddl', true) = 'on' THEN
        RETURN;  -- our own DDL, below
    END IF;
    PERFORM set_config('autoembed.in_ddl', 'on', true);
    FOR w IN SELECT x.* FROM autoembed.watches x
              WHERE x.source IN (SELECT c.objid FROM pg_event_trigger_ddl_commands() AS c
                                  WHERE c.classid = 'pg_class'::regclass) LOOP
        -- the search function names the table and its columns: made again for the table
        -- as it is now (refresh does nothing for a watch with a problem)
        BEGIN
            problem := autoembed.refresh(w.id);
            IF problem IS NOT NULL THEN
                -- said to whoever changed the table, at once (and by `autoembed status`)
                RAISE WARNING 'autoembed: % is not served any more: %', w.source, problem
                    USING HINT = format('Watch it again with the column it should read, or '
                                        '`autoembed unwatch %s` to stop watching it.', w.id);
            END IF;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'autoembed: could not follow the change of %: %', w.source, SQLERRM
                USING HINT = 'Run `autoembed status`; watch the table again to re-point the watch.';
        END;
    END LOOP;
    PERFORM set_config('autoembed.in_ddl', 'off', true);
END
$$;

CREATE OR REPLACE FUNCTION autoembed.on_sql_drop()
RETURNS event_trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    wid integer;
BEGIN
    IF current_setting('autoembed.in_ddl', true) = 'on' THEN
        RETURN;
    END IF;
    PERFORM set_config('autoembed.in_ddl', 'on', true);
    FOR wid IN SELECT x.id FROM autoembed.watches x
                WHERE x.source IN (SELECT d.objid FROM pg_event_trigger_dropped_objects() AS d
                                    WHERE d.classid = 'pg_class'::regclass AND d.objsubid = 0
                                      AND d.object_type = 'table') LOOP
        BEGIN
            PERFORM autoembed._uninstall(wid);
            DELETE FROM autoembed.watches x WHERE x.id = wid;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'autoembed: could not remove watch % of a dropped table: %', wid, SQLERRM
                USING HINT = 'Remove it with `autoembed unwatch <watch id>`.';
        END;
    END LOOP;
    PERFORM set_config('autoembed.in_ddl', 'off', true);
END
$$;

DO $ddl$
BEGIN
    IF NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        RAISE NOTICE 'autoembed: not a superuser, so no event triggers: a dropped table leaves its watch (autoembed unwatch <id> removes it), and a renamed column needs `autoembed watch` again';
        RETURN;
    END IF;
    DROP EVENT TRIGGER IF EXISTS autoembed_ddl_end;
    DROP EVENT TRIGGER IF EXISTS autoembed_sql_drop;
    CREATE EVENT TRIGGER autoembed_ddl_end ON ddl_command_end
        WHEN TAG IN ('ALTER TABLE') EXECUTE FUNCTION autoembed.on_ddl_end();
    CREATE EVENT TRIGGER autoembed_sql_drop ON sql_drop
        WHEN TAG IN ('DROP TABLE', 'DROP SCHEMA', 'DROP OWNED') EXECUTE FUNCTION autoembed.on_sql_drop();
END
$ddl$;
