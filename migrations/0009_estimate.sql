-- What `flow plan` estimated for a stage when it first started in this run (JSON: requests, tokens,
-- cost), shown beside what it spent.
ALTER TABLE stage_runs ADD COLUMN estimate TEXT;
