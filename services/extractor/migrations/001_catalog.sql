-- The staging catalog: what extraction learned from every file of a cohort.
-- Natural keys are scoped by cohort: the same study may belong to two cohorts.

CREATE TABLE IF NOT EXISTS catalog.subject (
    cohort_id     uuid NOT NULL,
    subject_id    text NOT NULL,              -- PatientID (a pseudonym after anonymization)
    patient_sex   text,
    patient_age   text,
    attributes    jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (cohort_id, subject_id)
);

CREATE TABLE IF NOT EXISTS catalog.study (
    cohort_id           uuid NOT NULL,
    study_instance_uid  text NOT NULL,
    subject_id          text NOT NULL,
    study_date          text,
    study_time          text,
    accession_number    text,
    study_description   text,
    attributes          jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (cohort_id, study_instance_uid)
);

CREATE TABLE IF NOT EXISTS catalog.series (
    cohort_id           uuid NOT NULL,
    series_instance_uid text NOT NULL,
    study_instance_uid  text NOT NULL,
    subject_id          text NOT NULL,
    modality            text,
    series_number       integer,
    series_description  text,
    protocol_name       text,
    manufacturer        text,
    manufacturer_model  text,
    attributes          jsonb NOT NULL DEFAULT '{}',
    stacks_dirty        boolean NOT NULL DEFAULT true,
    PRIMARY KEY (cohort_id, series_instance_uid)
);

CREATE TABLE IF NOT EXISTS catalog.instance (
    cohort_id           uuid NOT NULL,
    sop_instance_uid    text NOT NULL,
    series_instance_uid text NOT NULL,
    study_instance_uid  text NOT NULL,
    sop_class_uid       text NOT NULL,
    instance_number     integer,
    n_frames            integer NOT NULL DEFAULT 1,
    transfer_syntax_uid text,
    source_key          text NOT NULL,        -- path relative to the cohort source
    object_key          text NOT NULL,        -- where the bytes are in object storage
    sha256              text NOT NULL,
    size                bigint NOT NULL,
    job_id              uuid,
    record              jsonb NOT NULL,       -- flat row the stack builder re-derives stacks from
    header              jsonb NOT NULL,       -- the header as DICOM JSON (no bulk data)
    created_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cohort_id, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS instance_series ON catalog.instance (cohort_id, series_instance_uid);

CREATE TABLE IF NOT EXISTS catalog.mr_detail (
    cohort_id uuid NOT NULL, sop_instance_uid text NOT NULL,
    repetition_time float8, echo_time float8, inversion_time float8, flip_angle float8,
    echo_train_length integer, echo_numbers integer, scanning_sequence text, sequence_variant text,
    scan_options text, mr_acquisition_type text, sequence_name text, b_value float8,
    magnetic_field_strength float8, pixel_bandwidth float8,
    PRIMARY KEY (cohort_id, sop_instance_uid)
);
CREATE TABLE IF NOT EXISTS catalog.ct_detail (
    cohort_id uuid NOT NULL, sop_instance_uid text NOT NULL,
    kvp float8, convolution_kernel text, slice_thickness float8, exposure float8,
    xray_tube_current float8, contrast_bolus_agent text,
    PRIMARY KEY (cohort_id, sop_instance_uid)
);
CREATE TABLE IF NOT EXISTS catalog.pet_detail (
    cohort_id uuid NOT NULL, sop_instance_uid text NOT NULL,
    radiopharmaceutical text, units text, corrected_image text, decay_correction text,
    frame_reference_time float8, actual_frame_duration float8,
    PRIMARY KEY (cohort_id, sop_instance_uid)
);

CREATE TABLE IF NOT EXISTS catalog.series_stack (
    cohort_id           uuid NOT NULL,
    series_instance_uid text NOT NULL,
    stack_key           text NOT NULL,
    n_instances         integer NOT NULL,
    n_frames            integer NOT NULL,
    summary             jsonb NOT NULL,       -- shared.catalog.StackSummary
    sop_instance_uids   text[] NOT NULL,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cohort_id, series_instance_uid, stack_key)
);

-- every file seen, catalogued or not: resume reads nothing already recorded here
CREATE TABLE IF NOT EXISTS catalog.source_file (
    cohort_id        uuid NOT NULL,
    source_key       text NOT NULL,
    size             bigint NOT NULL,
    mtime_ns         bigint NOT NULL DEFAULT 0,
    sha256           text,
    status           text NOT NULL,           -- catalogued | rejected
    sop_instance_uid text,
    job_id           uuid,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cohort_id, source_key)
);

CREATE TABLE IF NOT EXISTS catalog.rejected_file (
    cohort_id   uuid NOT NULL,
    source_key  text NOT NULL,
    reason      text NOT NULL,
    size        bigint NOT NULL,
    sha256      text,
    job_id      uuid,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cohort_id, source_key)
);

-- views other services read (they never read the tables)
CREATE OR REPLACE VIEW catalog.series_v AS
SELECT s.cohort_id, s.subject_id, s.study_instance_uid, s.series_instance_uid, s.series_number,
       s.series_description, s.modality, s.protocol_name, s.manufacturer,
       (SELECT count(*) FROM catalog.instance i
         WHERE i.cohort_id = s.cohort_id AND i.series_instance_uid = s.series_instance_uid)::int AS n_instances
FROM catalog.series s;

CREATE OR REPLACE VIEW catalog.stack_v AS
SELECT cohort_id, series_instance_uid, stack_key, n_instances, n_frames
FROM catalog.series_stack;

CREATE OR REPLACE VIEW catalog.stack_summary_v AS
SELECT st.cohort_id, st.series_instance_uid, st.stack_key, st.summary, st.sop_instance_uids,
       st.updated_at, se.study_instance_uid, se.subject_id, se.modality
FROM catalog.series_stack st
JOIN catalog.series se USING (cohort_id, series_instance_uid);

CREATE OR REPLACE VIEW catalog.instance_v AS
SELECT cohort_id, sop_instance_uid, series_instance_uid, study_instance_uid, sop_class_uid,
       instance_number, n_frames, object_key, sha256, size
FROM catalog.instance;

CREATE OR REPLACE VIEW catalog.study_v AS
SELECT cohort_id, study_instance_uid, subject_id, study_date, study_time FROM catalog.study;
