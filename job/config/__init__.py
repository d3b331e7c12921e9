"""The job's configuration: the schema (one dataclass per section), loading and merging its layers,
value conversion, the generated reference (docs/config.md) and drift between restarts."""
