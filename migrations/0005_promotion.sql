-- Nightly refresh: a model's lineage by id, and what the promotion gate measured.

ALTER TABLE models ADD COLUMN parent_id INTEGER REFERENCES models(id);
-- JSON: the gate's metric, retriever and eval set, this model's value and the promoted model's it faced.
ALTER TABLE models ADD COLUMN gate TEXT;
