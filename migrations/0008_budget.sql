-- Why a run stopped before finishing when it was not a signal: `budget: <which cap, what was spent>`.
ALTER TABLE runs ADD COLUMN stop_reason TEXT;
