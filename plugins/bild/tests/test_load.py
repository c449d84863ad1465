"""The plugin is found through its entry point, like any installed plugin."""

import kdcore


def test_distribution_is_registered():
    registry = kdcore.get_registry()
    assert "kd-bild" in registry.distributions()
    assert not [f for f in registry.failures if f.distribution == "kd-bild"]
