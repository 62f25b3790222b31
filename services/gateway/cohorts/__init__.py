"""The gateway's domain core: cohort rules with no Kafka, Postgres or S3.

- `stage_order`: which stages apply to a cohort, which may run now, what a pipeline still has to run;
- `stage_config`: the per-stage configuration the user sends, validated with the user's key names
  (secrets redacted for storage, sealed for the stage services);
- `progress`: job progress, cohort status and completion percentage.
"""
