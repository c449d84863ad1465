"""The shared tiny corpus, tiny teacher and spec builder of ``kdcore.testing``.

Imported, not named in ``pytest_plugins``: pytest accepts that only in a top-level
conftest, and this repository's test run collects ``plugins/`` from its root.
"""

from kdcore.testing import corpus, spec_for, teacher_dir  # noqa: F401
