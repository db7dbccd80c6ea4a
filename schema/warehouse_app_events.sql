-- App events (the Firebase export in the real system) land straight in the warehouse, partitioned
-- by event_date (business date). BigQuery Standard SQL; transpiled for DuckDB.
CREATE TABLE IF NOT EXISTS app_events (
    event_id    INT64 NOT NULL,
    user_id     INT64 NOT NULL,
    event_at    TIMESTAMP NOT NULL,
    event_date  DATE NOT NULL,
    session_id  INT64 NOT NULL,
    event_name  STRING NOT NULL,   -- 'session_start' | 'screen_view'
    screen      STRING             -- 'home', 'card', 'topup', 'deferred', 'history', 'settings'
);
