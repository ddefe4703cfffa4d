-- What training chose on its validation split, kept with the model so every later stage uses the same:
-- alpha, the convex weight of the dense side when fused with BM25 (for the model's own retriever and
-- for the frozen black box), and whether training beat its starting model at all.
ALTER TABLE models ADD COLUMN alpha REAL;              -- hybrid over this model's retriever; NULL: not chosen
ALTER TABLE models ADD COLUMN black_box_alpha REAL;    -- hybrid over the black box, on the same split
ALTER TABLE models ADD COLUMN improved INTEGER;        -- 1 beat the start on validation, 0 did not, NULL no validation
