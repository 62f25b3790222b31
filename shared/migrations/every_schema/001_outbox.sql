-- Every schema's transactional outbox: rows written in the same transaction as the state change
-- they announce, published in `seq` order by the schema's relay (shared/outbox.py).
-- `{schema}` is replaced by the schema's name (shared/db.py, `migrate`).

CREATE TABLE IF NOT EXISTS {schema}.outbox (
    seq        bigserial PRIMARY KEY,
    id         uuid NOT NULL UNIQUE,
    topic      text NOT NULL,
    key        text,
    envelope   jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    sent_at    timestamptz
);
CREATE INDEX IF NOT EXISTS outbox_unsent ON {schema}.outbox (seq) WHERE sent_at IS NULL;
