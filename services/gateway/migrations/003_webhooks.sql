-- Webhook subscriptions of other systems and every delivery made to them. The signing secret is
-- shown once when the subscription is made and kept sealed with the project secret.
CREATE TABLE gateway.webhooks (
    id            uuid PRIMARY KEY,
    url           text NOT NULL,
    event_types   text[] NOT NULL,  -- names such as 'job.completed', or '*' for every event
    description   text NOT NULL DEFAULT '',
    secret_sealed text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE gateway.webhook_deliveries (
    id              uuid PRIMARY KEY,
    webhook_id      uuid NOT NULL REFERENCES gateway.webhooks (id) ON DELETE CASCADE,
    event_id        uuid NOT NULL,  -- the CloudEvent id, sent as `webhook-id`
    event_type      text NOT NULL,
    body            jsonb NOT NULL,  -- the structured CloudEvent sent
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_status     integer,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    UNIQUE (webhook_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON gateway.webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_of ON gateway.webhook_deliveries (webhook_id, created_at DESC);
