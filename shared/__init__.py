"""What two or more Cohortflow services share: contracts, settings and adapters."""
