"""Hook specifications of kdcore: the extension points a plugin implements.

Every collecting hook takes no arguments and returns an iterable of
:class:`kdcore.components.Component` records. A plugin implements any subset of them::

    # kd_mine/__init__.py
    import kdcore

    @kdcore.hookimpl
    def kd_losses():
        return [kdcore.Component(name="mine", factory=MyLoss, config=MyConfig, doc="...")]

and announces the module in its ``pyproject.toml``::

    [project.entry-points.kdcore]
    mine = "kd_mine"

Two hooks are not collecting: ``kd_add_commands`` (sub-commands of ``kd``) and
``kd_report_sections`` (sections of ``kd report``).

The built-in components are registered through these same hooks (``kdcore.builtins``).
A name registered twice within one kind is an error that names both distributions.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("kdcore")


@hookspec
def kd_losses() -> Iterable[Any]:
    """Contribute loss components.

    ``factory(config, setup)`` returns a callable ``loss(inputs) -> (value, metrics)``:

    - ``inputs`` is a :class:`kdcore.losses.LossInputs` with ``student`` (logits, and hidden
      states / attentions when the component ``requires`` them), ``teacher`` (a
      :class:`kdcore.signal.TeacherSignal` already aggregated and aligned, or None),
      ``batch`` (``input_ids``, ``labels``, ``mask`` and any extra arrays), ``params`` (the
      config resolved at this step: scheduled floats arrive as 0-d float32 arrays) and
      ``step``.
    - ``value`` is a scalar ``mx.array``; ``metrics`` maps names to scalars and is logged.

    A loss with learnable parameters returns an ``mlx.nn.Module``; its parameters train with
    the student and are saved beside it, never inside it.

    Example::

        @attrs.define
        class CosineConfig:
            temperature: float = 1.0

        def cosine_loss(config, setup):
            def loss(inputs):
                s = inputs.student.logits / inputs.params.temperature
                t = inputs.teacher.logits / inputs.params.temperature
                cos = (s * t).sum(-1) / (mx.linalg.norm(s, axis=-1) * mx.linalg.norm(t, axis=-1))
                return kdcore.masked_mean(1 - cos, inputs.batch["mask"]), {}
            return loss

        @kdcore.hookimpl
        def kd_losses():
            return [kdcore.Component("cosine", cosine_loss, CosineConfig,
                                     requires={"teacher"}, doc="1 - cosine of logits")]
    """


@hookspec
def kd_teacher_aggregators() -> Iterable[Any]:
    """Contribute teacher aggregators: N teacher signals in, one signal out.

    ``factory(config, setup)`` returns a callable ``aggregate(signals, inputs) -> signal``
    where ``signals`` is a list of :class:`kdcore.signal.TeacherSignal` (one per teacher,
    in spec order) and ``inputs`` the step's :class:`kdcore.losses.LossInputs` (student
    outputs and batch, for instance-dependent weights). It may be an ``nn.Module`` whose
    parameters train with the student. It may attach ``weights`` ([B, K], rows sum to 1)
    to the returned signal so losses and metrics can see them.

    Example::

        @kdcore.hookimpl
        def kd_teacher_aggregators():
            return [kdcore.Component("first", lambda config, setup: lambda s, i: s[0],
                                     doc="use the first teacher only")]
    """


@hookspec
def kd_student_initializers() -> Iterable[Any]:
    """Contribute student initializers.

    ``factory(config, setup)`` returns ``init(student, teachers) -> dict``: it modifies the
    freshly built student model in place (``teachers`` are loaded teacher models, possibly
    empty) and returns a report such as ``{"initialised_tensors": 12}`` that the run logs.

    Example::

        @kdcore.hookimpl
        def kd_student_initializers():
            def zeros(config, setup):
                def init(student, teachers):
                    params = student.parameters()
                    student.update(mlx.utils.tree_map(mx.zeros_like, params))
                    return {"initialised_tensors": len(mlx.utils.tree_flatten(params))}
                return init
            return [kdcore.Component("zeros", zeros, doc="all parameters zero")]
    """


@hookspec
def kd_vocab_aligners() -> Iterable[Any]:
    """Contribute vocabulary aligners: teacher signal into the student's vocabulary.

    ``factory(config, setup)`` returns an object with ``prepare(teacher_tokenizer,
    student_tokenizer)`` (called once before training; raises ``kdcore.SpecError`` if the
    vocabularies cannot be mapped) and ``__call__(signal) -> signal``.

    Example::

        @kdcore.hookimpl
        def kd_vocab_aligners():
            return [kdcore.Component("identity", IdentityAligner, doc="same vocabulary")]
    """


@hookspec
def kd_schedulers() -> Iterable[Any]:
    """Contribute schedulers: step -> value, for temperatures, loss weights and learning rates.

    ``factory(config, setup)`` returns ``value(step, total_steps) -> float``. In a spec any
    float may be written as ``{schedule = "NAME", ...config fields}``; ``total_steps``
    defaults to the run's steps unless the config sets ``steps``.

    Example::

        @attrs.define
        class HalfConfig:
            start: float = 1.0

        @kdcore.hookimpl
        def kd_schedulers():
            def half(config, setup):
                return lambda step, total: config.start if step < total // 2 else 0.0
            return [kdcore.Component("half", half, HalfConfig, doc="start, then 0 halfway")]
    """


@hookspec
def kd_models() -> Iterable[Any]:
    """Contribute model architectures usable as student or teacher.

    ``factory(config, setup)`` returns an ``mlx.nn.Module`` whose ``__call__(input_ids,
    capture=frozenset())`` returns :class:`kdcore.models.ModelOutput` (logits, and hidden
    states / attentions when asked in ``capture``). A saved model directory names its
    architecture in ``config.json`` under ``"kd_model"``.

    Example::

        @kdcore.hookimpl
        def kd_models():
            return [kdcore.Component("transformer", Transformer, TransformerConfig,
                                     doc="decoder-only transformer")]
    """


@hookspec
def kd_datasets() -> Iterable[Any]:
    """Contribute dataset formats.

    ``factory(config, setup)`` returns a :class:`kdcore.data.Dataset`: train/val batches
    of ``input_ids``, ``labels`` (-100 where no loss), ``mask`` and any extra arrays its
    losses need, plus ``inspect()`` for ``kd data inspect``. ``setup.tokenizer`` is the
    run's tokenizer.

    Example::

        @kdcore.hookimpl
        def kd_datasets():
            return [kdcore.Component("text", TextDataset, TextConfig, doc="a UTF-8 text file")]
    """


@hookspec
def kd_teacher_sources() -> Iterable[Any]:
    """Contribute teacher sources: where a teacher's signal comes from.

    ``factory(config, setup)`` returns an object with ``tokenizer`` (or None),
    ``model`` (an ``nn.Module`` or None), ``num_parameters`` and
    ``signal(batch, capture, student) -> TeacherSignal``. Built-ins: ``model`` (a saved
    model directory) and ``cache`` (an offline top-k cache).

    Example::

        @kdcore.hookimpl
        def kd_teacher_sources():
            return [kdcore.Component("ema", EmaTeacher, EmaConfig, doc="moving average")]
    """


@hookspec
def kd_metrics() -> Iterable[Any]:
    """Contribute evaluation metrics for ``kd eval``.

    ``factory(config, setup)`` returns ``metric(student, teacher, context) -> dict`` where
    ``context`` carries the run directory, tokenizer and command-line options (``pairs``
    file and others). The dict is merged into the evaluation report under the metric's name.
    A metric that does not apply (no ``--pairs`` given, say) returns ``{}``.

    Example::

        @kdcore.hookimpl
        def kd_metrics():
            return [kdcore.Component("preference", PreferenceMetric, doc="pair accuracy")]
    """


@hookspec
def kd_run_callbacks() -> Iterable[Any]:
    """Contribute run callbacks: sinks for metrics and events during ``kd distill``.

    ``factory(config, setup)`` returns an object with any of ``on_start(run)``,
    ``on_log(step, record)``, ``on_eval(step, record)``, ``on_end(summary)``.

    Example::

        @kdcore.hookimpl
        def kd_run_callbacks():
            return [kdcore.Component("print", lambda c, s: PrintSink(), doc="print each log")]
    """


@hookspec
def kd_add_commands(subparsers: Any) -> None:
    """Add sub-commands to the ``kd`` command line.

    :param subparsers: the ``argparse`` sub-parsers action of ``kd``; a plugin calls
        ``subparsers.add_parser(...)`` and sets ``func`` with ``set_defaults``.

    Example::

        @kdcore.hookimpl
        def kd_add_commands(subparsers):
            p = subparsers.add_parser("hello", help="say hello")
            p.set_defaults(func=lambda args: print("hello") or 0)
    """


@hookspec
def kd_report_sections(run_dir: Path, figures_dir: Path) -> list[str] | None:
    """Add a section to ``kd report RUN_DIR``.

    Called once per implementation, after the built-in curves, in registration order. It
    returns the Markdown lines to append to ``RUN_DIR/report.md`` (starting with its own
    ``## `` heading), or None when the run is not one it knows about (check ``spec.toml``
    or ``run.json``; ``run_dir`` may be any folder with a ``metrics.jsonl``). Figures go
    into ``figures_dir`` (``RUN_DIR/report``, already created) and are linked relative to
    the report as ``report/NAME.png``; prefix NAME with the plugin's name.

    An implementation that raises does not lose the report: the report is written with a
    line naming the plugin's distribution and the error, and the other sections still
    run. With ``KD_STRICT_PLUGINS=1`` ``kd report`` then fails (after writing the report).

    :param run_dir: the ``kd distill`` run folder.
    :param figures_dir: the folder for the report's PNG files.

    Example::

        @kdcore.hookimpl
        def kd_report_sections(run_dir, figures_dir):
            if not (run_dir / "spec.toml").exists():
                return None
            steps = len((run_dir / "metrics.jsonl").read_text().splitlines())
            return ["## Mine", "", f"- metric records: {steps}", ""]
    """
