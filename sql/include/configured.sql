\set ECHO none
-- fresh.sql, then settings that point at the simulator
\ir fresh.sql
UPDATE d365.settings
   SET org_url = :'sim_url', authority_url = :'sim_url',
       tenant_id = '11111111-1111-1111-1111-111111111111',
       client_id = '22222222-2222-2222-2222-222222222222',
       client_secret = 'sim-secret',
       contact_sync_enabled = true, min_score = 10;
