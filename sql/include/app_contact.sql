\set ECHO none
-- configured.sql, then the contact table app_contact attached, mapped and
-- synced: contacts 1, 3, 4, 5 and 6 linked, 2 below the minimum score.
\ir configured.sql
SET client_min_messages = warning;
DROP TABLE IF EXISTS app_contact CASCADE;
RESET client_min_messages;
CREATE TABLE app_contact (
    id         bigint PRIMARY KEY,
    first_name text,
    last_name  text,
    email      text,
    score      integer NOT NULL DEFAULT 0,
    birthday   date,
    last_seen  timestamptz,
    kids       integer,
    no_email   boolean,
    income     numeric(12,2),
    company    uuid,
    gender     smallint,
    tags       text[],
    note       text
);
INSERT INTO app_contact (id, first_name, last_name, email, score) VALUES
    (1, 'Ada', 'Lovelace', 'ada@example.com', 50),
    (2, 'Bob', 'Below', 'bob@example.com', 5),
    (3, 'Cy', 'High', 'cy@example.com', 99),
    (4, 'Dee', 'Rollback', 'dee@example.com', 20),
    (5, 'Erin', 'Failing', 'erin@example.com', 30),
    (6, 'Fay', 'Fine', 'fay@example.com', 30);
SELECT d365.d365_attach_contacts('app_contact');
INSERT INTO d365.field_map VALUES
    ('first_name', 'firstname'), ('last_name', 'lastname'), ('email', 'emailaddress1');
SELECT created, failed FROM d365.d365_sync_contacts();
