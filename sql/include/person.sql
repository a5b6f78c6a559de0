\set ECHO none
-- configured.sql, then the contact table person attached, mapped and
-- synced (Ada, Bob and Cy linked); :ada and :bob hold their Dynamics ids.
\ir configured.sql
SET client_min_messages = warning;
DROP TABLE IF EXISTS person CASCADE;
RESET client_min_messages;
CREATE TABLE person (
    id         integer PRIMARY KEY,
    first_name text,
    last_name  text,
    email      text,
    score      integer NOT NULL,
    birthday   date,
    kids       integer,
    vip        boolean,
    income     numeric,
    company    uuid,
    seen       timestamptz,
    gender     smallint,
    note       text
);
INSERT INTO person VALUES
    (1, 'Ada', 'Lovelace', 'ada@example.com', 50, '1815-12-10', 1, true, 125000.50,
        'acc00000-0000-4000-8000-000000000001', '2024-01-01 10:00Z', 2, 'local only'),
    (2, 'Bob', 'Builder', 'bob@example.com', 50, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
    (3, 'Cy', 'Clear', 'cy@example.com', 50, NULL, 3, NULL, NULL, NULL, NULL, NULL, NULL);
SELECT d365.d365_attach_contacts('person');
INSERT INTO d365.field_map VALUES
    ('first_name', 'firstname'), ('last_name', 'lastname'), ('email', 'emailaddress1'),
    ('birthday', 'birthdate'), ('kids', 'numberofchildren'), ('vip', 'donotemail'),
    ('income', 'annualincome'), ('company', 'parentcustomerid_account@odata.bind'),
    ('seen', 'lastusedincampaign'), ('gender', 'gendercode');
SELECT created, failed FROM d365.d365_sync_contacts();
SELECT dynamics365_related_id AS ada FROM person WHERE id = 1 \gset
SELECT dynamics365_related_id AS bob FROM person WHERE id = 2 \gset
