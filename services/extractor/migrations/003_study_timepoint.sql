-- The study's timepoint label (ClinicalTrialTimePointID, set by the anonymizer's
-- study_dates.timepoint_labels) in the study view: the exporter names date-less sessions by it.
CREATE OR REPLACE VIEW catalog.study_v AS
SELECT cohort_id, study_instance_uid, subject_id, study_date, study_time,
       attributes ->> 'timepoint' AS timepoint
FROM catalog.study;
