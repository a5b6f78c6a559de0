-- Run history
-- ---------------------------------------------------------------------------

CREATE TABLE d365.sync_run (
    id          bigserial PRIMARY KEY,
    kind        text NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    created     integer NOT NULL DEFAULT 0,
    updated     integer NOT NULL DEFAULT 0,
    unchanged   integer NOT NULL DEFAULT 0,
    failed      integer NOT NULL DEFAULT 0,
    unlinked    integer NOT NULL DEFAULT 0,
    requests    integer NOT NULL DEFAULT 0,
    throttled   integer NOT NULL DEFAULT 0,
    message     text
);
CREATE INDEX sync_run_kind_idx ON d365.sync_run (kind, id);
SELECT pg_catalog.pg_extension_config_dump('d365.sync_run', '');
SELECT pg_catalog.pg_extension_config_dump('d365.sync_run_id_seq', '');
COMMENT ON TABLE d365.sync_run IS
    'One row per sync run: what it did, the HTTP requests it made, and why it stopped early if it did';

-- ---------------------------------------------------------------------------
