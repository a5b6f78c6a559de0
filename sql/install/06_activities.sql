-- Activities: the local log, type mapping, bodies, and the engine's SQL
-- stages (the send stage is the C pipeline).
-- ---------------------------------------------------------------------------

/*
 * The activity log.  dynamics_activity_id is chosen when the activity is
 * logged, so every attempt to create it addresses the same Dynamics record
 * (create-only upsert: a retry after a lost commit finds it there instead of
 * making a second one).  synced_at NULL means pending.
 */
CREATE TABLE d365.activity (
    id                   bigserial PRIMARY KEY,
    contact_key          text NOT NULL,
    activity_type        text NOT NULL CHECK (activity_type <> ''),
    subject              text,
    details              jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(details) = 'object'),
    occurred_at          timestamptz NOT NULL DEFAULT now(),
    logged_at            timestamptz NOT NULL DEFAULT now(),
    dynamics_activity_id uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    dynamics_entity      text,
    synced_at            timestamptz,
    attempts             integer NOT NULL DEFAULT 0,
    next_attempt_at      timestamptz,
    last_status          integer,
    last_error_code      text,
    last_error           text
);
CREATE INDEX activity_pending_idx ON d365.activity (contact_key, id) WHERE synced_at IS NULL;
COMMENT ON TABLE d365.activity IS
    'Local activity log; an activity is pending until synced_at is set, and is sent once';
COMMENT ON COLUMN d365.activity.dynamics_activity_id IS
    'The id the activity has (once synced_at is set) in Dynamics';
SELECT pg_catalog.pg_extension_config_dump('d365.activity', '');
SELECT pg_catalog.pg_extension_config_dump('d365.activity_id_seq', '');

CREATE TABLE d365.activity_type_map (
    activity_type   text PRIMARY KEY,
    dynamics_entity text NOT NULL CHECK (dynamics_entity ~ '^[a-z][a-z0-9_]*$')
);
COMMENT ON TABLE d365.activity_type_map IS
    'Activity type -> Dynamics activity entity (logical name); types not listed map to themselves';
SELECT pg_catalog.pg_extension_config_dump('d365.activity_type_map', '');

-- A new or changed type mapping applies at once to the pending activities
-- it concerns, instead of after their back-off.
CREATE FUNCTION d365._activity_retry_now()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE d365.activity SET next_attempt_at = NULL
     WHERE synced_at IS NULL AND activity_type = NEW.activity_type;
    RETURN NULL;
END;
$$;
CREATE TRIGGER activity_type_map_retry
    AFTER INSERT OR UPDATE ON d365.activity_type_map
    FOR EACH ROW EXECUTE FUNCTION d365._activity_retry_now();

CREATE TABLE d365.activity_mapper (
    dynamics_entity text PRIMARY KEY,
    mapper          regprocedure NOT NULL
);
COMMENT ON TABLE d365.activity_mapper IS
    'Custom body mapping: mapper(dynamics_entity text, dynamics_contact_id uuid, activity jsonb) returns jsonb merged over the built-in body';
SELECT pg_catalog.pg_extension_config_dump('d365.activity_mapper', '');

CREATE FUNCTION d365._activity_mapper_check()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_proc p
                    WHERE p.oid = NEW.mapper
                      AND p.proargtypes = '25 2950 3802'::oidvector
                      AND p.prorettype = 'jsonb'::regtype
                      AND p.prokind = 'f' AND NOT p.proretset) THEN
        RAISE EXCEPTION 'function % is not an activity mapper', NEW.mapper
            USING ERRCODE = 'invalid_function_definition',
                  DETAIL = 'A mapper takes (dynamics_entity text, dynamics_contact_id uuid, activity jsonb) and returns jsonb.',
                  HINT = 'Create it as CREATE FUNCTION my_mapper(text, uuid, jsonb) RETURNS jsonb ...';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER activity_mapper_check
    BEFORE INSERT OR UPDATE ON d365.activity_mapper
    FOR EACH ROW EXECUTE FUNCTION d365._activity_mapper_check();

/*
 * An activity mapper, called as the mapper function's owner in a
 * security-restricted operation (src/privilege/table_owner.c): whoever runs the
 * activity sync -- a superuser, a pg_cron job, d365_log_activity() running
 * as the extension's owner -- never runs a mapper with their own rights.
 * Only functions registered in d365.activity_mapper are called, and only
 * for a caller that may EXECUTE them.
 */
CREATE FUNCTION d365._activity_mapper_call(mapper regprocedure, entity text,
                                           dynamics_contact_id uuid, activity jsonb)
RETURNS jsonb
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_activity_mapper_call'
LANGUAGE C VOLATILE;

-- Whether a function is a registered activity mapper (the caller of
-- d365._activity_mapper_call may not be able to read d365.activity_mapper).
CREATE FUNCTION d365._is_activity_mapper(mapper regprocedure)
RETURNS boolean
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT EXISTS (SELECT FROM d365.activity_mapper m WHERE m.mapper = $1) $$;

-- Dynamics users by internal email, from the cached list; a GUID is taken as
-- a user id.  NULL when no such user exists.
CREATE FUNCTION d365._user_id(email_or_id text)
RETURNS uuid
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN d365._is_guid(email_or_id)
            THEN email_or_id::uuid
        ELSE (SELECT (u ->> 'systemuserid')::uuid
                FROM jsonb_array_elements(d365._get_cached(
                         'systemusers?$select=systemuserid,internalemailaddress,fullname,accessmode,isdisabled')) u
               WHERE lower(u ->> 'internalemailaddress') = lower(email_or_id)
               LIMIT 1)
    END
$$;

CREATE FUNCTION d365._utc(ts timestamptz)
RETURNS text
SET search_path = pg_catalog, pg_temp
LANGUAGE sql IMMUTABLE
AS $$ SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') $$;

/*
 * The built-in body of an activity (docs/activities.md, "Activity types and
 * built-in bodies"): regarding = the contact
 * (Microsoft's suffixed bind), subject, description, scheduledstart, the
 * default owner, and per entity: phonecall, email, task, appointment
 * fields and activity parties.  A problem that makes the activity unsendable
 * (an unknown attendee) comes back as {"__error": "..."}.
 */
CREATE FUNCTION d365._activity_body(a d365.activity, entity text, contact_id uuid)
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    owner text := (SELECT default_owner FROM d365.settings);
    d jsonb := a.details;
    b jsonb;
    parties jsonb := '[]';
    contact_bind text := format('/contacts(%s)', contact_id);
    outgoing boolean;
    user_id uuid;
    who text;
    ends timestamptz;
BEGIN
    b := jsonb_build_object(
        'subject', coalesce(a.subject, d ->> 'subject', initcap(replace(a.activity_type, '_', ' '))),
        'description', d ->> 'description',
        'scheduledstart', d365._utc(a.occurred_at),
        format('regardingobjectid_contact_%s@odata.bind', entity), contact_bind);
    IF owner IS NOT NULL THEN
        b := b || jsonb_build_object('ownerid@odata.bind', owner);
    END IF;

    CASE entity
    WHEN 'phonecall' THEN
        outgoing := coalesce(lower(d ->> 'direction'), 'outgoing') <> 'incoming';
        b := b || jsonb_build_object(
            'phonenumber', d ->> 'phone_number',
            'directioncode', outgoing,
            'actualdurationminutes', (d ->> 'duration_minutes')::integer,
            'scheduledend', d365._utc(a.occurred_at),
            'actualend', d365._utc(a.occurred_at));
        parties := parties || jsonb_build_object('partyid_contact@odata.bind', contact_bind,
                                                 'participationtypemask', CASE WHEN outgoing THEN 2 ELSE 1 END);
        IF d ? 'from_email' THEN
            user_id := d365._user_id(d ->> 'from_email');
            IF user_id IS NOT NULL THEN
                parties := parties || jsonb_build_object('partyid_systemuser@odata.bind', format('/systemusers(%s)', user_id),
                                                         'participationtypemask', CASE WHEN outgoing THEN 1 ELSE 2 END);
            END IF;
        END IF;
        b := b || jsonb_build_object('phonecall_activity_parties', parties);
    WHEN 'email' THEN
        b := b || jsonb_build_object('description', coalesce(d ->> 'body', d ->> 'description'),
                                     'directioncode', true);
        parties := parties || jsonb_strip_nulls(jsonb_build_object(
            'partyid_contact@odata.bind', contact_bind, 'participationtypemask', 2,
            'addressused', d ->> 'to_email'));
        IF d ? 'from_email' THEN
            user_id := d365._user_id(d ->> 'from_email');
            IF user_id IS NOT NULL THEN
                parties := parties || jsonb_build_object('partyid_systemuser@odata.bind', format('/systemusers(%s)', user_id),
                                                         'participationtypemask', 1);
            END IF;
        END IF;
        b := b || jsonb_build_object('email_activity_parties', parties);
    WHEN 'task' THEN
        b := b || jsonb_build_object(
            'scheduledend', d365._utc((d ->> 'due')::timestamptz),
            'prioritycode', (d ->> 'priority')::integer,
            'actualdurationminutes', (d ->> 'duration_minutes')::integer);
    WHEN 'appointment' THEN
        IF coalesce((d ->> 'all_day')::boolean, false) THEN
            ends := coalesce((d ->> 'ends_at')::timestamptz, a.occurred_at + interval '1 day');
        ELSE
            ends := coalesce((d ->> 'ends_at')::timestamptz, a.occurred_at + interval '30 minutes');
        END IF;
        b := b || jsonb_build_object(
            'scheduledend', d365._utc(ends),
            'scheduleddurationminutes', (extract(epoch FROM ends - a.occurred_at) / 60)::integer,
            'isalldayevent', coalesce((d ->> 'all_day')::boolean, false),
            'location', d ->> 'location');
        parties := parties || jsonb_build_object('partyid_contact@odata.bind', contact_bind,
                                                 'participationtypemask', 5);
        FOR who IN SELECT jsonb_array_elements_text(coalesce(d -> 'required_attendees', '[]')) LOOP
            user_id := d365._user_id(who);
            IF user_id IS NULL THEN
                RETURN jsonb_build_object('__error', format('no Dynamics user has the email %s', who));
            END IF;
            parties := parties || jsonb_build_object('partyid_systemuser@odata.bind', format('/systemusers(%s)', user_id),
                                                     'participationtypemask', 5);
        END LOOP;
        FOR who IN SELECT jsonb_array_elements_text(coalesce(d -> 'optional_attendees', '[]')) LOOP
            user_id := d365._user_id(who);
            IF user_id IS NULL THEN
                RETURN jsonb_build_object('__error', format('no Dynamics user has the email %s', who));
            END IF;
            parties := parties || jsonb_build_object('partyid_systemuser@odata.bind', format('/systemusers(%s)', user_id),
                                                     'participationtypemask', 6);
        END LOOP;
        IF owner LIKE '/systemusers(%' THEN
            parties := parties || jsonb_build_object('partyid_systemuser@odata.bind', owner,
                                                     'participationtypemask', 7);
        END IF;
        b := b || jsonb_build_object('appointment_activity_parties', parties);
    ELSE
        NULL;   -- any other activity entity: the generic body
    END CASE;
    RETURN jsonb_strip_nulls(b);
EXCEPTION WHEN data_exception THEN
    -- a details value that does not fit (a date, a number) fails this
    -- activity alone, with the reason
    RETURN jsonb_build_object('__error', 'the activity''s details do not fit: ' || SQLERRM);
END;
$$;

-- statecode/statuscode that complete an activity after it is created, or
-- NULL for activities that stay open.
CREATE FUNCTION d365._activity_completion(entity text, details jsonb)
RETURNS jsonb
SET search_path = pg_catalog, pg_temp
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE entity
        WHEN 'phonecall' THEN jsonb_build_object('statecode', 1, 'statuscode',
             CASE WHEN lower(details ->> 'direction') = 'incoming' THEN 4 ELSE 2 END)
        WHEN 'email' THEN '{"statecode": 1, "statuscode": 2}'::jsonb
    END
$$;

/*
 * The work query of an activity sync.  mode:
 *   'scheduled'  every pending activity of a linked contact, past its back-off
 *   'one'        the activity one_id (the query's $1), whatever its back-off
 *   'recent'     pending activities of contacts synced in this transaction
 * Requests per activity: a create-only upsert (If-None-Match: *, a 412 means
 * an earlier attempt created it), then for phone calls and emails the PATCH
 * that completes it.
 */
CREATE FUNCTION d365._activity_work_sql(mode text, one_id bigint DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src d365.contact_source;
    mappers text := '';
    m record;
    sel text;
    pending boolean;
BEGIN
    src := d365._contact_source();
    -- row security is the table owner's code: never run as the role running
    -- the job (d365sync refuses such a role; docs/security.md)
    IF row_security_active(src.contact_table) THEN
        RAISE EXCEPTION 'row-level security of % applies to role "%"', src.contact_table, current_user
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'Its policies are code of the table''s owner: d365sync does not read the table as a role they bind.',
                  HINT = 'Run the sync as the table''s owner, or as a role with BYPASSRLS.';
    END IF;
    -- the job reads the table as the job role: for a caller that may read it
    PERFORM d365._caller_reads(src.contact_table);

    sel := CASE mode
        WHEN 'scheduled' THEN '(a.next_attempt_at IS NULL OR a.next_attempt_at <= now())'
        WHEN 'one' THEN 'a.id = $1'
        WHEN 'recent' THEN 'c.dynamics365_synchronized_on = now() AND (a.next_attempt_at IS NULL OR a.next_attempt_at <= now())'
    END;

    -- nothing pending: no metadata request, no work
    EXECUTE format('SELECT EXISTS (SELECT FROM d365.activity a JOIN %s c ON c.%I::text = a.contact_key'
                   ' JOIN d365.contact_state cs ON cs.contact_key = a.contact_key'
                   '  AND cs.dynamics_id = c.dynamics365_related_id'
                   ' WHERE a.synced_at IS NULL AND c.dynamics365_related_id IS NOT NULL AND %s)',
                   src.contact_table, src.key_column,
                   CASE mode WHEN 'one' THEN 'a.id = $1' ELSE sel END)
        INTO pending USING one_id;
    IF NOT pending THEN
        RETURN 'SELECT NULL::text, NULL::text, NULL::text WHERE false';
    END IF;

    FOR m IN SELECT dynamics_entity, mapper FROM d365.activity_mapper ORDER BY 1 LOOP
        mappers := mappers || format(' WHEN %L THEN d365._activity_mapper_call(%L::pg_catalog.regprocedure,'
                                     ' t.entity, c.dynamics365_related_id, pg_catalog.to_jsonb(a))',
                                     m.dynamics_entity, m.mapper);
    END LOOP;
    IF mappers <> '' THEN
        mappers := format('coalesce(CASE t.entity %s END, ''{}'')', mappers);
    ELSE
        mappers := '''{}''::jsonb';
    END IF;

    RETURN format($q$
        WITH ent AS (
            SELECT e ->> 'LogicalName' AS name, e ->> 'EntitySetName' AS entity_set
              FROM jsonb_array_elements(d365._get_cached(
                       'EntityDefinitions?$select=LogicalName,EntitySetName,IsActivity')) e
             WHERE (e ->> 'IsActivity')::boolean
               AND e ->> 'EntitySetName' ~ '^[A-Za-z0-9_]+$')
        SELECT a.id::text AS item_key,
               CASE WHEN x.err IS NOT NULL THEN '[]'
                    ELSE (jsonb_build_array(jsonb_build_object(
                              'method', 'PATCH',
                              'path', format('%%s(%%s)', ent.entity_set, a.dynamics_activity_id),
                              'body', bb.body::text,
                              'headers', '["If-None-Match: *"]'::jsonb,
                              'ok', '[412]'::jsonb))
                          || CASE WHEN d365._activity_completion(t.entity, a.details) IS NULL THEN '[]'::jsonb
                                  ELSE jsonb_build_array(jsonb_build_object(
                                      'method', 'PATCH',
                                      'path', format('%%s(%%s)', ent.entity_set, a.dynamics_activity_id),
                                      'body', d365._activity_completion(t.entity, a.details)::text,
                                      'headers', '["If-Match: *"]'::jsonb)) END)::text
               END AS requests,
               jsonb_build_object('entity', t.entity, 'error', x.err)::text AS context
          FROM d365.activity a
          JOIN %1$s c ON c.%2$I::text = a.contact_key AND c.dynamics365_related_id IS NOT NULL
          -- only a link d365sync wrote (d365._contact_untrusted_sql)
          JOIN d365.contact_state cs ON cs.contact_key = a.contact_key
                                    AND cs.dynamics_id = c.dynamics365_related_id
          LEFT JOIN d365.activity_type_map tm ON tm.activity_type = a.activity_type
          CROSS JOIN LATERAL (SELECT coalesce(tm.dynamics_entity, a.activity_type) AS entity) t
          LEFT JOIN ent ON ent.name = t.entity
          CROSS JOIN LATERAL (
              SELECT CASE WHEN ent.name IS NULL THEN NULL
                          ELSE d365._activity_body(a, t.entity, c.dynamics365_related_id) || %3$s
                     END AS body) bb
          CROSS JOIN LATERAL (
              SELECT CASE WHEN ent.name IS NULL
                          THEN format('activity type "%%s" is not a Dynamics activity entity (it maps to "%%s")',
                                      a.activity_type, t.entity)
                          ELSE bb.body ->> '__error' END AS err) x
         WHERE a.synced_at IS NULL AND %4$s
         ORDER BY a.id
    $q$, src.contact_table, src.key_column, mappers, sel);
END;
$$;

/*
 * The record stage of an activity sync: synced_at for what Dynamics now
 * has, the failure and a back-off for the rest.
 */
CREATE FUNCTION d365._activity_record(
    item_keys text[], contexts text[], statuses integer[],
    error_codes text[], error_messages text[],
    OUT created integer, OUT updated integer, OUT unchanged integer,
    OUT failed integer, OUT unlinked integer)
RETURNS record
LANGUAGE plpgsql
-- a chunk against the whole table: always by index, so a chunk's cost does
-- not grow with the table (the planner knows nothing of the chunk's size)
SET enable_hashjoin = off
SET enable_mergejoin = off
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    WITH o AS (
        SELECT k::bigint AS id, ctx::jsonb ->> 'entity' AS entity,
               coalesce(msg, ctx::jsonb ->> 'error') AS err, st, code
          FROM unnest(item_keys, contexts, statuses, error_codes, error_messages)
                   AS u(k, ctx, st, code, msg)),
    ok AS (
        UPDATE d365.activity a
           SET synced_at = now(), dynamics_entity = o.entity, attempts = 0,
               next_attempt_at = NULL, last_status = o.st, last_error_code = NULL,
               last_error = NULL
          FROM o
         WHERE a.id = o.id AND o.err IS NULL AND o.st IS NOT NULL
        RETURNING a.id),
    bad AS (
        UPDATE d365.activity a
           SET attempts = a.attempts + 1,
               next_attempt_at = d365._next_attempt(a.attempts + 1),
               dynamics_entity = o.entity, last_status = nullif(o.st, 0),
               last_error_code = o.code, last_error = o.err
          FROM o
         WHERE a.id = o.id AND (o.err IS NOT NULL OR o.st IS NULL)
        RETURNING a.id)
    SELECT (SELECT count(*) FROM ok), 0, 0, (SELECT count(*) FROM bad), 0
      INTO created, updated, unchanged, failed, unlinked;
END;
$$;

/*
 * Sends one logged activity now through the pipeline.  strict: raise the
 * failure as an ERROR; otherwise a WARNING says the activity stays pending.
 * Returns the Dynamics id, or NULL when it was not created.
 */
CREATE FUNCTION d365._send_activity(activity_id bigint, strict boolean)
RETURNS uuid
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_send_activity'
LANGUAGE C VOLATILE STRICT;

CREATE FUNCTION d365._contact_for_activity(contact_key text, must_be_linked boolean)
RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src d365.contact_source;
    found_key text;
    link uuid;
BEGIN
    src := d365._contact_source();
    EXECUTE format('SELECT %I::text, dynamics365_related_id FROM %s WHERE %I::text = $1',
                   src.key_column, src.contact_table, src.key_column)
       INTO found_key, link USING contact_key;
    IF found_key IS NULL THEN
        RAISE EXCEPTION 'contact % does not exist', contact_key
            USING ERRCODE = 'no_data_found',
                  HINT = format('The key is looked up in %s.', src.contact_table);
    END IF;
    IF must_be_linked AND link IS NULL THEN
        RAISE EXCEPTION 'contact % is not linked to Dynamics 365', contact_key
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'Tasks and appointments are created for a contact that exists in Dynamics.',
                  HINT = 'Call d365_sync_contact() for it first.';
    END IF;
    RETURN link;
END;
$$;

CREATE FUNCTION d365.d365_log_activity(
    contact_key anyelement,
    activity_type text,
    subject text DEFAULT NULL,
    details jsonb DEFAULT '{}',
    occurred_at timestamptz DEFAULT now())
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    link uuid := d365._contact_for_activity(d365._key_text(contact_key), false);
    new_id bigint;
BEGIN
    INSERT INTO d365.activity (contact_key, activity_type, subject, details, occurred_at)
    VALUES (d365._key_text(contact_key), activity_type, subject, coalesce(details, '{}'), coalesce(occurred_at, now()))
    RETURNING id INTO new_id;
    IF link IS NOT NULL AND (SELECT activity_sync_enabled FROM d365.settings) THEN
        IF (SELECT realtime FROM d365.settings) THEN
            -- queued: the background worker sends it once this transaction
            -- commits, and never if it rolls back
            PERFORM d365._worker_wake(false);
        ELSE
            PERFORM d365._send_activity(new_id, false);
        END IF;
    END IF;
    RETURN new_id;
END;
$$;
COMMENT ON FUNCTION d365.d365_log_activity(anyelement, text, text, jsonb, timestamptz) IS
    'Logs an activity; when activity sync is on and the contact is linked, creates it in Dynamics at once, or with realtime on queues it for the background worker (sent at commit); else it stays pending';

CREATE FUNCTION d365.d365_create_task(
    contact_key anyelement,
    subject text,
    description text DEFAULT NULL,
    due timestamptz DEFAULT NULL,
    priority integer DEFAULT NULL,
    duration_minutes integer DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    new_id bigint;
BEGIN
    PERFORM d365._contact_for_activity(d365._key_text(contact_key), true);
    IF priority IS NOT NULL AND priority NOT IN (0, 1, 2) THEN
        RAISE EXCEPTION 'invalid task priority %', priority
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Dynamics task priorities are 0 (low), 1 (normal) and 2 (high).';
    END IF;
    INSERT INTO d365.activity (contact_key, activity_type, subject, details)
    VALUES (d365._key_text(contact_key), 'task', subject,
            jsonb_strip_nulls(jsonb_build_object('description', description, 'due', due,
                                                 'priority', priority,
                                                 'duration_minutes', duration_minutes)))
    RETURNING id INTO new_id;
    RETURN d365._send_activity(new_id, true);
END;
$$;
COMMENT ON FUNCTION d365.d365_create_task(anyelement, text, text, timestamptz, integer, integer) IS
    'Creates a task in Dynamics now, regarding a linked contact, owned by the default owner';

CREATE FUNCTION d365.d365_create_appointment(
    contact_key anyelement,
    subject text,
    starts_at timestamptz,
    ends_at timestamptz DEFAULT NULL,
    all_day boolean DEFAULT false,
    location text DEFAULT NULL,
    description text DEFAULT NULL,
    required_attendees text[] DEFAULT '{}',
    optional_attendees text[] DEFAULT '{}')
RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    new_id bigint;
    who text;
BEGIN
    PERFORM d365._contact_for_activity(d365._key_text(contact_key), true);
    IF starts_at IS NULL THEN
        RAISE EXCEPTION 'an appointment needs a start time'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF ends_at IS NOT NULL AND ends_at < starts_at THEN
        RAISE EXCEPTION 'the appointment ends before it starts'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('starts_at is %s, ends_at is %s.', starts_at, ends_at);
    END IF;
    FOREACH who IN ARRAY coalesce(required_attendees, '{}') || coalesce(optional_attendees, '{}') LOOP
        IF d365._user_id(who) IS NULL THEN
            RAISE EXCEPTION 'no Dynamics user has the email %', who
                USING ERRCODE = 'undefined_object',
                      HINT = 'Attendees are Dynamics users, given by internal email address or systemuserid; d365_owners() lists them.';
        END IF;
    END LOOP;
    INSERT INTO d365.activity (contact_key, activity_type, subject, occurred_at, details)
    VALUES (d365._key_text(contact_key), 'appointment', subject, starts_at,
            jsonb_strip_nulls(jsonb_build_object(
                'ends_at', ends_at, 'all_day', coalesce(all_day, false), 'location', location,
                'description', description,
                'required_attendees', to_jsonb(coalesce(required_attendees, '{}')),
                'optional_attendees', to_jsonb(coalesce(optional_attendees, '{}')))))
    RETURNING id INTO new_id;
    RETURN d365._send_activity(new_id, true);
END;
$$;
COMMENT ON FUNCTION d365.d365_create_appointment(anyelement, text, timestamptz, timestamptz, boolean, text, text, text[], text[]) IS
    'Creates an appointment in Dynamics now: the contact and the given users as attendees, the default owner (a user) as organizer';

CREATE FUNCTION d365.d365_sync_activities(
    OUT created integer, OUT failed integer, OUT requests integer)
RETURNS record
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_sync_activities'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION d365.d365_sync_activities() IS
    'The scheduled activity sync: creates every pending activity of a linked contact';

-- ---------------------------------------------------------------------------
