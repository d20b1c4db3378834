-- Stored Responses (`POST /v1/responses` with `store`). A row is written once, whole,
-- when its response has ended: there are no rows of responses still being generated.
CREATE TABLE responses (
    id                   TEXT PRIMARY KEY,
    -- The response this one continues (`previous_response_id`), NULL for a first turn.
    previous_response_id TEXT,
    -- Unix seconds.
    created_at           INTEGER NOT NULL,
    -- Unix seconds of creation or of the last response chained on this one; retention
    -- evicts by it, so a conversation in use keeps its whole chain.
    used_at              INTEGER NOT NULL,
    -- JSON array: the input items of this request alone (earlier turns are in the rows
    -- of the chain).
    input                TEXT NOT NULL,
    -- JSON object: the response as it was returned.
    response             TEXT NOT NULL
) STRICT;

CREATE INDEX responses_used_at ON responses (used_at);
