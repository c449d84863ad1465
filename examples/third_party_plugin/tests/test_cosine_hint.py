"""Drive the plugin through kdcore's public API, as a user would."""

from kdcore import testing


def test_conforms():
    testing.check_loss("cosine_hint")
