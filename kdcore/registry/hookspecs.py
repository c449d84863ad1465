"""Hook specifications of kdcore: the extension points a plugin implements.

Every collecting hook takes no arguments and returns an iterable of
:class:`kdcore.Component` records, one per component. A component's ``factory(config,
setup)`` is called with its structured config and a :class:`kdcore.Setup`; the object it
returns must satisfy the protocol of its kind in ``kdcore.protocols`` (exported as
``kdcore.Loss``, ``kdcore.Aggregator`` ...). The optional capabilities (``PreparesBatch``,
``AfterStep``, ``HasState``, ``Learnable``, ``HasRequirements``, ``PreparesVocabularies``)
are checked with ``isinstance``: implement the method or attribute and the engine uses it.

A plugin implements any subset of the hooks::

    # kd_mine/__init__.py
    import kdcore

    @kdcore.hookimpl
    def kd_losses():
        return [kdcore.Component(name="mine", factory=my_loss, config=MyConfig, doc="...")]

and announces the module in its ``pyproject.toml``::

    [project.entry-points.kdcore]
    mine = "kd_mine"

Three hooks are not collecting: ``kd_add_commands`` (sub-commands of ``kd``),
``kd_report_sections`` (sections of ``kd report``) and ``kd_row_kernels`` (native loss rows).

The built-in components are registered through these same hooks (``kdcore.builtins``).
A plugin that breaks the rules is a load failure of that plugin alone, listed by ``kd
plugins`` and ``kd doctor`` with the reason, the others still working: a hook that raises
or returns something other than Components, a misspelt ``kd_`` hook name, an import that
fails (``SystemExit`` included), a name another distribution registered first (built-ins
register first). With ``KD_STRICT_PLUGINS=1`` any such failure is fatal.
docs/authoring-plugins.md walks through a complete plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("kdcore")


@hookspec
def kd_losses() -> Iterable[Any]:
    """Contribute loss components.

    ``factory(config, setup)`` returns a :class:`kdcore.Loss`: ``loss(inputs) -> (value,
    metrics)``, called once per step and micro-batch inside autodiff.

    - ``inputs`` is a :class:`kdcore.LossInputs`: ``student`` (a :class:`kdcore.ModelOutput`:
      ``student.logits`` [B, L, V], or ``student.final_hidden`` with
      ``student.logits_of(rows)`` chunk by chunk; hidden states / attentions when the
      component ``requires`` them), ``teacher`` (a :class:`kdcore.TeacherSignal` already
      aggregated and aligned, or None), ``batch`` (``input_ids``, ``labels``, ``mask`` and
      any extra arrays), ``params`` (the config at this step: each scheduled float is a 0-d
      float32 array; read scheduled values here, never from the factory's ``config``),
      ``step`` and ``total_steps``.
    - ``value`` is a scalar ``mx.array``; ``metrics`` maps names to scalar arrays, logged as
      ``LABEL/NAME``.

    Optional: :class:`kdcore.PreparesBatch` (``prepare_batch(batch, context)`` outside
    autodiff, ``context`` a :class:`kdcore.StepContext`). A loss that is an
    ``mlx.nn.Module`` trains its parameters with the student; they are saved in checkpoints,
    never inside ``student/``. Declare ``requires`` from :data:`app.REQUIREMENTS` and
    ``properties`` from :data:`app.PROPERTIES`; ``sparse_ok`` (the loss works from a
    top-k cache) is honest only when the loss reads the teacher through
    :func:`kdcore.token_divergence` or ``TeacherSignal.sparse_log_probs``.

    Example::

        @attrs.define
        class L2Config:
            temperature: float = 1.0

        def prob_l2(config, setup):
            def loss(inputs):
                t = inputs.params.temperature
                q = mx.softmax(inputs.student.logits / t, axis=-1)
                p = mx.exp(inputs.teacher.log_probs(t))  # dense or mixture, not top-k
                return kdcore.masked_mean(((q - p) ** 2).sum(-1), inputs.batch["mask"]), {}
            return loss

        @kdcore.hookimpl
        def kd_losses():
            return [kdcore.Component("prob_l2", prob_l2, L2Config, requires={"teacher"},
                                     properties={"zero_at_identity", "shift_invariant"},
                                     doc="squared L2 of student and teacher probabilities")]
    """


@hookspec
def kd_teacher_aggregators() -> Iterable[Any]:
    """Contribute teacher aggregators: N teacher signals in, one signal out.

    ``factory(config, setup)`` returns a :class:`kdcore.Aggregator`: ``aggregate(signals,
    inputs) -> signal`` where ``signals`` is a list of :class:`kdcore.TeacherSignal` (one
    per teacher, in spec order) and ``inputs`` the step's :class:`kdcore.LossInputs`
    without a teacher (student outputs and batch, for instance-dependent weights).
    :func:`kdcore.mixture` builds the usual result; ``weights`` ([B, K] or [B, L, K], rows
    summing to 1) on the returned signal are logged as ``teacher_weight/K``.
    ``setup.num_teachers`` says how many teachers the spec names.

    Optional: :class:`kdcore.HasRequirements` (``requires``, a frozenset of
    :data:`app.REQUIREMENTS` that depends on the config) and, for an ``nn.Module``
    aggregator whose parameters train with the student, :class:`kdcore.Learnable`
    (``learnable = False`` keeps it frozen).

    Example::

        @kdcore.hookimpl
        def kd_teacher_aggregators():
            return [kdcore.Component("first", lambda config, setup: lambda s, i: s[0],
                                     doc="use the first teacher only")]
    """


@hookspec
def kd_student_initializers() -> Iterable[Any]:
    """Contribute student initializers.

    ``factory(config, setup)`` returns a :class:`kdcore.Initializer`: ``init(student,
    teachers) -> dict`` modifies the freshly built student in place (``teachers`` are the
    teacher models, None where a source has none, such as a cache) and returns a report such
    as ``{"initialised_tensors": 12}`` that the run's summary records under ``init``.
    ``setup.student_config`` and ``setup.teacher_configs`` are the model configs.

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

    ``factory(config, setup)`` returns a :class:`kdcore.Aligner`: ``align(signal) ->
    signal``, applied to the aggregated signal every step.

    Optional: :class:`kdcore.PreparesVocabularies` (``prepare(teacher_tokenizer,
    student_tokenizer)``, called once before training; it raises :class:`kdcore.SpecError`
    when the vocabularies cannot be mapped).

    Example::

        @kdcore.hookimpl
        def kd_vocab_aligners():
            return [kdcore.Component("identity", lambda config, setup: lambda signal: signal,
                                     doc="same vocabulary")]
    """


@hookspec
def kd_schedulers() -> Iterable[Any]:
    """Contribute schedulers: step -> value, for temperatures, loss weights and learning rates.

    ``factory(config, setup)`` returns a :class:`kdcore.Scheduler`: ``value(step,
    total_steps) -> float``; it is built while the spec is read, with ``setup`` None. In a
    spec any float may be written as ``{schedule = "NAME", ...config fields}``;
    ``total_steps`` is the run's steps unless the config sets ``steps``.

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

    ``factory(config, setup)`` returns a :class:`kdcore.Model`: an ``mlx.nn.Module`` whose
    ``__call__(input_ids, capture=frozenset())`` returns a :class:`kdcore.ModelOutput`
    (``final_hidden`` and ``head``, or ``logits``; hidden states / attentions when
    ``capture`` names them). A saved model directory names its architecture in
    ``config.json`` under ``"kd_model"``.

    Example::

        @kdcore.hookimpl
        def kd_models():
            return [kdcore.Component("transformer", app.Transformer,
                                     app.TransformerConfig, doc="decoder-only transformer")]
    """


@hookspec
def kd_datasets() -> Iterable[Any]:
    """Contribute dataset formats.

    ``factory(config, setup)`` returns a :class:`kdcore.Dataset`: ``tokenizer``,
    ``batch(index, batch_size, split)`` and ``batches(batch_size, split, limit)`` of NumPy
    arrays ``input_ids``, ``labels`` (``kdcore.IGNORE_INDEX`` where no loss), ``mask`` and
    any extra arrays its losses need, and ``inspect(limit)`` for ``kd data inspect``.
    Subclassing :class:`kdcore.Dataset` and filling ``_examples`` gives all of these.
    ``setup.base_dir`` resolves relative paths (``setup.resolve(path)``); ``setup.tokenizer``
    is None during a run (the dataset names its own) and set by ``kd eval``.

    Example::

        @kdcore.hookimpl
        def kd_datasets():
            return [kdcore.Component("text", TextDataset, TextConfig, doc="a UTF-8 text file")]
    """


@hookspec
def kd_teacher_sources() -> Iterable[Any]:
    """Contribute teacher sources: where a teacher's signal comes from.

    ``factory(config, setup)`` returns a :class:`kdcore.TeacherSource`: ``tokenizer`` (or
    None), ``model`` (an ``nn.Module`` or None), ``num_parameters`` and ``signal(batch,
    capture, student) -> TeacherSignal``. ``setup.teacher`` is the spec's teacher entry and
    ``setup.extras["dataset"]`` the run's dataset. Built-ins: ``model`` (a saved model
    directory) and ``cache`` (an offline top-k cache).

    Optional: :class:`kdcore.AfterStep` (``after_step(student, step, total_steps)`` after
    each optimizer step) and :class:`kdcore.HasState` (``state_arrays()`` saved in
    checkpoints, ``load_state_arrays(arrays)`` on resume).

    Example::

        @kdcore.hookimpl
        def kd_teacher_sources():
            return [kdcore.Component("ema", EmaTeacher, EmaConfig, doc="moving average")]
    """


@hookspec
def kd_metrics() -> Iterable[Any]:
    """Contribute evaluation metrics for ``kd eval``.

    ``factory(config, setup)`` (with the default config) returns a :class:`kdcore.Metric`:
    ``metric(student, teacher, context) -> dict`` where ``teacher`` is the teacher model or
    None and ``context`` has ``run_dir``, ``spec``, ``tokenizer`` and the command-line
    options (``pairs`` and others). The dict is merged into the evaluation report under the
    metric's name; a metric that does not apply (no ``--pairs`` given, say) returns ``{}``.

    Example::

        @kdcore.hookimpl
        def kd_metrics():
            return [kdcore.Component("preference", PreferenceMetric, doc="pair accuracy")]
    """


@hookspec
def kd_run_callbacks() -> Iterable[Any]:
    """Contribute run callbacks: sinks for metrics and events during ``kd distill``.

    ``factory(config, setup)`` returns a :class:`kdcore.RunCallback`: an object with any of
    ``on_start(info)`` (``info`` a :class:`app.RunInfo`: ``output``, ``spec``,
    ``total_steps``), ``on_log(step, record)``, ``on_eval(step, record)`` and
    ``on_end(summary)``; the engine calls those present. A spec lists callbacks under
    ``[[callbacks]]``.

    Example::

        @kdcore.hookimpl
        def kd_run_callbacks():
            return [kdcore.Component("print", lambda c, s: PrintSink(), doc="print each log")]
    """


@hookspec
def kd_row_kernels() -> Mapping[str, Callable[..., Any]] | None:
    """Contribute faster implementations of the core's loss row functions (and its Adam step).

    Not a collecting hook: it returns a mapping from a row function's name to a factory.
    The core calls the factory where it would build its own row function, and on a CPU
    default device runs what it returns instead (``KD_KERNELS=pure`` turns every such
    kernel off; on other devices the core's own rows run). The names and their factories:

    - a dense divergence of :data:`kdcore.DIVERGENCES` (``"forward_kl"``, ``"gjsd"``, ...):
      ``factory(coef, temperature, teacher_temperature)`` where ``coef`` is the ``beta`` or
      ``alpha`` of the kind (0.0 for the others), replacing ``dense_rows``;
    - ``"sparse:KIND"`` for each of those: ``factory(coef, temperature, tail)`` (``tail`` one
      of :data:`testing.TAIL_POLICIES`), replacing ``sparse_rows`` (a top-k teacher);
    - ``"cross_entropy"``: ``factory(label_smoothing)``, replacing the fused path's
      ``cross_entropy_rows``;
    - ``"adam"``: ``factory()`` returning ``step(gradient, parameter, m, v, scalars,
      bias_correction) -> (parameter, m, v)`` for float32 arrays of one shape, the update of
      kdcore's ``adam`` and ``adamw`` optimizers (``kdcore.engine.optim`` documents the
      eight scalars; the result must equal mlx.optimizers.AdamW's).

    A loss row's factory returns a row function ``rows(scale [C, 1], s [C, V], *inputs) -> (values
    [C], scale * d values / d s [C, V])``, both float32, with ``inputs`` the teacher's
    logits ``[C, V]``, the top-k ids ``[C, K]`` and log-probabilities ``[C, K or K + 1]``,
    or the labels ``[C]``, and equal to the core's
    (``kdcore.testing.row_terms`` documents each divergence's value and gradient), or None
    to leave those parameters to the core. A ``description`` attribute on a factory (how it
    was built, what it uses) is shown by ``kd doctor``. A name another distribution
    registered first makes this plugin a load failure, as for components.

    Example::

        @kdcore.hookimpl
        def kd_row_kernels():
            def forward_kl(coef, temperature, teacher_temperature):
                return my_native_forward_kl(1.0 / temperature, 1.0 / teacher_temperature)
            forward_kl.description = "my kernel, AVX2"
            return {"forward_kl": forward_kl}
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
