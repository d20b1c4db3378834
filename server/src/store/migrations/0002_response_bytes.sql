-- Each row's size, so that retention keeps the store within --store-max-mb. The sizes
-- are kept summed in one row by triggers: checking the budget on every write reads one
-- row, not the table.
ALTER TABLE responses ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
UPDATE responses SET bytes = length(CAST(input AS BLOB)) + length(CAST(response AS BLOB));

CREATE TABLE totals (
    id    INTEGER PRIMARY KEY CHECK (id = 0),
    bytes INTEGER NOT NULL
) STRICT;
INSERT INTO totals (id, bytes) SELECT 0, coalesce(sum(bytes), 0) FROM responses;

CREATE TRIGGER responses_bytes_added AFTER INSERT ON responses
BEGIN
    UPDATE totals SET bytes = bytes + NEW.bytes WHERE id = 0;
END;

CREATE TRIGGER responses_bytes_removed AFTER DELETE ON responses
BEGIN
    UPDATE totals SET bytes = bytes - OLD.bytes WHERE id = 0;
END;
