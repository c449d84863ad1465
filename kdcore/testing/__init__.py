"""Conformance kit for plugin authors: run your component through the contracts of its kind.

Usage in a plugin's tests::

    from kdcore import testing

    def test_my_loss_conforms():
        testing.check_loss("cosine", temperature=2.0)

    def test_my_scheduler_conforms():
        testing.check_scheduler("half", start=3.0)

Each ``check_*`` draws inputs with hypothesis (set ``KD_HYPOTHESIS_PROFILE=thorough`` for
more examples) and raises ``AssertionError`` naming the contract that failed.

Loss contracts: the value is a finite scalar; gradients with respect to the student's
logits are finite for logits up to +/-``bound``; adding a constant to every logit of the
student or teacher at a position changes nothing; changing masked positions changes
nothing; when the component declares ``zero_at_identity``, the loss is 0 when the
student's logits equal the teacher's; and a loss that declares rows gives the same value
and gradient on both of its paths, fused with the output head and on full logits.

:func:`build_loss` builds a registered loss to call as the step calls it (its params
resolved into ``inputs.params``), with ``.fused(inputs)`` for the fused path.

The package is also a pytest plugin (it is not registered automatically: it imports
hypothesis). Its fixtures: ``corpus`` (a small text file), ``teacher_dir`` (a tiny teacher
trained on it, once per session), ``spec_for`` (``spec_for(losses, **kw)``: :func:`tiny_spec`
on the corpus) and ``random_model_dir`` (an untrained byte-level model directory). Enable
them with ``pytest_plugins = ["kdcore.testing"]`` in a top-level conftest.py; in a conftest
below the rootdir (pytest refuses ``pytest_plugins`` there) import them instead::

    from kdcore.testing import corpus, spec_for, teacher_dir  # noqa: F401

Helpers for tests that drive the engine: :func:`run_kd` (the ``kd`` command in-process),
:func:`plugins` (a registry with in-process plugin objects, restored afterwards),
:func:`build_run` and :func:`prepare_batch` (a run's built parts, and a batch after its
losses' ``prepare_batch``); the divergence kernels (:func:`dense_divergence`,
:func:`sparse_divergence`, :func:`chunked_token_mean`, :func:`rows_on_logits`) and their
plain reference formulations (:func:`plain_divergence`, :func:`plain_sparse_divergence`,
:func:`row_terms`).
"""

from __future__ import annotations

# The references and kernels live with the code they check; a plugin author reaches them
# here, to compare a loss against them.
from kdcore.kernels.chunked import chunked_token_mean
from kdcore.kernels.divergence import (
    dense_divergence,
    plain_divergence,
    plain_sparse_divergence,
    row_terms,
    sparse_divergence,
)
from kdcore.kernels.support import TAILS as TAIL_POLICIES
from kdcore.losses.rows import rows_on_logits
from kdcore.testing._kit import (
    PROFILE,
    check_aggregator,
    check_loss,
    check_scheduler,
    default_batch,
    floats,
    logit_pairs,
    shapes,
)
from kdcore.testing._loss import LossUnderTest, build_loss
from kdcore.testing._runs import (
    build_run,
    corpus,
    plugins,
    prepare_batch,
    random_model_dir,
    run_kd,
    save_random_model,
    spec_for,
    teacher_dir,
    tiny_spec,
    train_tiny_teacher,
)

__all__ = [
    # conformance
    "PROFILE",
    "LossUnderTest",
    "build_loss",
    "check_aggregator",
    "check_loss",
    "check_scheduler",
    "default_batch",
    "floats",
    "logit_pairs",
    "shapes",
    # tiny runs
    "build_run",
    "plugins",
    "prepare_batch",
    "run_kd",
    "save_random_model",
    "tiny_spec",
    "train_tiny_teacher",
    # references
    "TAIL_POLICIES",
    "chunked_token_mean",
    "dense_divergence",
    "rows_on_logits",
    "sparse_divergence",
    "plain_divergence",
    "plain_sparse_divergence",
    "row_terms",
    # fixtures
    "corpus",
    "random_model_dir",
    "spec_for",
    "teacher_dir",
]
