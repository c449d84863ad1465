"""The spec: schema, conversion, loading, overrides, composition checks, schedules."""
