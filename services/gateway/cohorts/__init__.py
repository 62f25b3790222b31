"""The gateway's domain core: cohort rules with no Kafka, Postgres or S3.

- `stage_order`: which stages apply to a cohort, which may run now, what a pipeline still has to run;
- `progress`: job progress, cohort status and completion percentage.
"""
