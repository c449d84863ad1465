"""The shared tiny corpus and tiny teacher of ``kdcore.testing`` (imported, not named in
``pytest_plugins``: pytest accepts that only in a top-level conftest)."""

from kdcore.testing import corpus, teacher_dir  # noqa: F401
