-- The service, logged in as a member of paysvc_app, checks at start that the schema is the one its code
-- expects, reading the migration history (found by an operator's walk-through: it tried to create the history
-- table first, and could not start at all as the role the documentation prescribes). It still may not change
-- the history, nor the schema: migrations are run by the owner (`paysvc migrate`).
GRANT SELECT ON schema_migrations TO paysvc_app;
