-- 19: the one-time tokens of the guards' scan pages (portal/patrol/model.py issue_token, redeem_token), rows of the
-- store on both engines like sessions, so a page opened through one portal instance is confirmed through any other
-- (a centre's balancer has no sticky sessions). Used up by the scan's own transaction; expired ones are deleted when
-- the next token is issued. From now on patrol_scans.nonce holds the token's hash too. One file for both engines.
CREATE TABLE patrol_tokens (
    token_hash TEXT PRIMARY KEY,         -- sha256 of the token; the token itself is never stored
    session TEXT NOT NULL,               -- the staff session's id hash it was issued to
    checkpoint_id BIGINT NOT NULL,       -- the checkpoint whose page showed it
    expires DOUBLE PRECISION NOT NULL    -- unix seconds (wall clock: the instances share no other)
);
CREATE INDEX patrol_tokens_session ON patrol_tokens(session);
CREATE INDEX patrol_tokens_expires ON patrol_tokens(expires);
