-- 15: rate limits and sign-in locks held in the store (portal/ratelimit.py SharedLimiter, portal/auth.py SharedLocks),
-- used when several portal instances share the store (PostgreSQL), so a limit or a lock holds whichever instance a
-- request reaches; one instance on SQLite keeps them in memory, as before. Times are wall-clock unix seconds (the
-- instances share no monotonic clock). One file for both engines: the SQL both read.
CREATE TABLE limit_buckets (
    name TEXT NOT NULL,                  -- the limit ("scan", "bad-code", ...)
    key TEXT NOT NULL,                   -- what it counts by (an address, a person, a house)
    tokens DOUBLE PRECISION NOT NULL,
    at DOUBLE PRECISION NOT NULL,        -- when tokens was last worked out
    PRIMARY KEY (name, key)
);
CREATE INDEX limit_buckets_at ON limit_buckets(at);
CREATE TABLE signin_strikes (
    kind TEXT NOT NULL,                  -- staff | resident: whose secrets
    scope TEXT NOT NULL,                 -- user+address | address | user
    key TEXT NOT NULL,
    failures TEXT NOT NULL DEFAULT '[]', -- JSON [unix seconds]: the failures within the window
    locked_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    level BIGINT NOT NULL DEFAULT 0,     -- locks so far: the next one lasts window * 2**level
    refused BIGINT NOT NULL DEFAULT 0,   -- attempts refused under the current lock
    at DOUBLE PRECISION NOT NULL,        -- last change
    PRIMARY KEY (kind, scope, key)
);
CREATE INDEX signin_strikes_at ON signin_strikes(at);
CREATE TABLE signin_known (              -- (name, address) pairs that signed in, exempt from the wider locks
    kind TEXT NOT NULL,
    pair TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (kind, pair)
);
CREATE INDEX signin_known_at ON signin_known(at);
