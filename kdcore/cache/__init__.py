"""The offline top-k teacher cache: format, writing, reading."""
