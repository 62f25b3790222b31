"""The exporter service. `SCHEMA` is the Postgres schema it owns (its tables, its outbox
and, for a stage, its runtime tables); `cohortflow migrate` reads it from here."""

SCHEMA = "export"
