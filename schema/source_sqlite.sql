-- The same operational tables on SQLite (the embedded default). Times are ISO-8601 UTC text
-- ('2026-11-26T03:04:05.123456+00:00'), dates 'YYYY-MM-DD'; the sync casts them to Arrow types.

CREATE TABLE IF NOT EXISTS users (
    user_id              INTEGER PRIMARY KEY,
    signed_up_at         TEXT NOT NULL,
    birth_year           INTEGER NOT NULL,
    prefecture           TEXT NOT NULL,
    identity_verified_at TEXT,
    status               TEXT NOT NULL,
    updated_at           TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS users_updated_at ON users (updated_at);

CREATE TABLE IF NOT EXISTS card_transactions (
    transaction_id    INTEGER PRIMARY KEY,
    user_id           INTEGER NOT NULL,
    authorized_at     TEXT NOT NULL,
    amount_jpy        INTEGER NOT NULL,
    merchant_id       INTEGER NOT NULL,
    merchant_category TEXT NOT NULL,
    channel           TEXT NOT NULL,
    status            TEXT NOT NULL,
    updated_at        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS card_transactions_updated_at ON card_transactions (updated_at);

CREATE TABLE IF NOT EXISTS topups (
    topup_id      INTEGER PRIMARY KEY,
    user_id       INTEGER NOT NULL,
    topped_up_at  TEXT NOT NULL,
    amount_jpy    INTEGER NOT NULL,
    method        TEXT NOT NULL,
    updated_at    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS topups_updated_at ON topups (updated_at);

CREATE TABLE IF NOT EXISTS deferred_charges (
    charge_id     INTEGER PRIMARY KEY,
    user_id       INTEGER NOT NULL,
    requested_at  TEXT NOT NULL,
    amount_jpy    INTEGER NOT NULL,
    fee_jpy       INTEGER NOT NULL,
    due_date      TEXT NOT NULL,
    status        TEXT NOT NULL,
    repaid_at     TEXT,
    days_late     INTEGER,
    updated_at    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS deferred_charges_updated_at ON deferred_charges (updated_at);
