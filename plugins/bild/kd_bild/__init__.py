"""kdcore plugin kd-bild."""

import kdcore


@kdcore.hookimpl
def kd_losses():
    return []
