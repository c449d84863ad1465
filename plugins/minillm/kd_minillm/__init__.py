"""kdcore plugin kd-minillm: reverse-KL family and on-policy MiniLLM distillation."""

import kdcore
from kd_minillm import divergences, onpolicy


@kdcore.hookimpl
def kd_losses():
    return [*divergences.components(), *onpolicy.components()]
