-- The operational database of the prepaid card (PostgreSQL). Money is bigint yen; times are UTC.
-- Every table carries updated_at, maintained by the application, which the daily sync reads
-- incrementally. App events do not live here: they land straight in the warehouse.

CREATE TABLE IF NOT EXISTS users (
    user_id              bigint PRIMARY KEY,
    signed_up_at         timestamptz NOT NULL,
    birth_year           integer NOT NULL,
    prefecture           text NOT NULL,             -- JIS prefecture name, e.g. 'Tokyo'
    identity_verified_at timestamptz,               -- NULL until eKYC passes
    status               text NOT NULL,             -- 'active' | 'closed'
    updated_at           timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS users_updated_at ON users (updated_at);

CREATE TABLE IF NOT EXISTS card_transactions (
    transaction_id    bigint PRIMARY KEY,
    user_id           bigint NOT NULL,
    authorized_at     timestamptz NOT NULL,
    amount_jpy        bigint NOT NULL,
    merchant_id       bigint NOT NULL,
    merchant_category text NOT NULL,                -- grocery, convenience, dining, transport, ...
    channel           text NOT NULL,                -- 'in_store' | 'online' | 'contactless'
    status            text NOT NULL,                -- 'settled' | 'declined' | 'refunded'
    updated_at        timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS card_transactions_updated_at ON card_transactions (updated_at);

CREATE TABLE IF NOT EXISTS topups (
    topup_id      bigint PRIMARY KEY,
    user_id       bigint NOT NULL,
    topped_up_at  timestamptz NOT NULL,
    amount_jpy    bigint NOT NULL,
    method        text NOT NULL,                    -- 'convenience_store' | 'bank' | 'credit_card' | 'deferred'
    updated_at    timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS topups_updated_at ON topups (updated_at);

CREATE TABLE IF NOT EXISTS deferred_charges (
    charge_id     bigint PRIMARY KEY,
    user_id       bigint NOT NULL,
    requested_at  timestamptz NOT NULL,
    amount_jpy    bigint NOT NULL,
    fee_jpy       bigint NOT NULL,
    due_date      date NOT NULL,                    -- business date (Asia/Tokyo)
    status        text NOT NULL,                    -- 'outstanding' | 'repaid' | 'defaulted'
    repaid_at     timestamptz,
    days_late     integer,                          -- days past due_date at repayment (0 = on time)
    updated_at    timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS deferred_charges_updated_at ON deferred_charges (updated_at);
