"""The nine GLUE tasks as the READ paper fed them to T5 (DESIGN.md section 3).

    >>> from read_cache.tasks.specs import get_task
    >>> get_task("mnli").t5_input({"hypothesis": "A cat sleeps.", "premise": "The cat naps."})
    'mnli hypothesis: A cat sleeps. premise: The cat naps.'

A `TaskSpec` is the single description of a task that the loader, the tokenizer step and the
metrics share: the hub's column names, T5's text-to-text prompt, the label words (index = the hub's
label id) and the metric GLUE reports for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import replace as dataclass_replace
from enum import Enum
from string import Formatter

from read_cache.errors import ReadCacheError
from read_cache.kinds import TASK_NAMES, task_name

LM_PROMPT_END = "\nanswer:"
"""What a decoder-only model's default prompt ends with: the task's T5 text, then a line after which the label word
would follow (`TaskSpec.lm_template`). Plain text, no chat template: the base model continues it."""

PROTOCOLS = ("t5", "lst")
"""How splits, inputs and targets are made (`--protocol`): this package's recipe with T5's label words,
or Ladder Side-Tuning's (the READ paper's code) with the label digits; see `read_cache.tasks.data`."""


class Metric(str, Enum):
    """The metric GLUE reports for a task (a `str` Enum so it round-trips through JSON)."""

    MATTHEWS = "matthews"
    ACCURACY = "accuracy"
    F1_ACCURACY = "f1_accuracy"
    PEARSON_SPEARMAN = "pearson_spearman"


@dataclass(frozen=True)
class TaskSpec:
    """One GLUE task: its schema on the hub, its T5 prompt, its labels and its metric."""

    name: str
    """Short name used on the command line and in caches, e.g. "sst2"."""

    hub_config: str
    """Config name of the `nyu-mll/glue` dataset on the hub (also its parquet folder name)."""

    text_fields: tuple[str, ...]
    """The hub's text column names, in the order they appear in the T5 input."""

    t5_template: str
    """T5's text-to-text input, with one `{field}` placeholder per entry of `text_fields`."""

    label_words: tuple[str, ...]
    """T5's target word for each label; index = the hub's label id. Empty for regression (stsb)."""

    metric: Metric
    """The metric GLUE reports for this task (see `read_cache.tasks.metrics.score`)."""

    lst_template: str | None = None
    """Ladder Side-Tuning's input (`--protocol lst`) where it differs from `t5_template` (only MNLI's does)."""

    @property
    def is_regression(self) -> bool:
        """True for STS-B, whose label is a similarity score in [0, 5] rather than a class."""
        return not self.label_words

    @property
    def num_labels(self) -> int:
        """Number of classes, or 1 for regression (the width of a classifier head)."""
        return 1 if self.is_regression else len(self.label_words)

    def targets(self, protocol: str = "t5") -> tuple[str, ...]:
        """The label words the `lm` head scores: T5's words (t5), or the label digits "0", "1", "2" (lst)."""
        if protocol == "lst" and not self.is_regression:
            return tuple(str(i) for i in range(self.num_labels))
        return self.label_words

    def template(self, protocol: str = "t5") -> str:
        """The text-to-text input template under `protocol`."""
        return self.lst_template if protocol == "lst" and self.lst_template else self.t5_template

    def lm_template(self, protocol: str = "t5") -> str:
        """A decoder-only model's default prompt: the T5 text, ending where the label word would follow."""
        return self.template(protocol) + LM_PROMPT_END

    def check_template(self, template: str) -> None:
        """A `--prompt` must name each of the task's text fields once and nothing else; else a one-line error."""
        try:
            names = [name for _, name, _, _ in Formatter().parse(template) if name is not None]
        except ValueError as e:
            raise ReadCacheError(f"--prompt {template!r} is not a format string ({e}); write fields as {{{self.text_fields[0]}}}") from None
        if sorted(names) != sorted(self.text_fields):
            want = " ".join(f"{{{f}}}" for f in self.text_fields)
            raise ReadCacheError(f"--prompt {template!r} has fields {names}; {self.name} needs exactly {want} (literal braces as {{{{ }}}})")

    def t5_input(self, fields: Mapping[str, str] | Sequence[str], protocol: str = "t5") -> str:
        """Format one example as T5 saw it (under `protocol`: "t5", or Ladder Side-Tuning's "lst")."""
        return self.fill(self.template(protocol), fields)

    def fill(self, template: str, fields: Mapping[str, str] | Sequence[str]) -> str:
        """`template` with one example's texts in it.

        `fields` is either a mapping keyed by `text_fields` (a hub row works as is) or a sequence
        in `text_fields` order (as `SplitData.texts` stores it).
        """
        if isinstance(fields, Mapping):
            missing = [f for f in self.text_fields if f not in fields]
            if missing:
                raise ValueError(f"{self.name} example lacks text field(s) {missing}")
            values = {f: fields[f] for f in self.text_fields}
        else:
            if len(fields) != len(self.text_fields):
                raise ValueError(
                    f"{self.name} expects {len(self.text_fields)} text field(s) "
                    f"{self.text_fields}, got {len(fields)}"
                )
            values = dict(zip(self.text_fields, fields))
        return template.format(**values)


def _pair(name: str, first: str, second: str, labels: tuple[str, ...], metric: Metric) -> TaskSpec:
    """A sentence-pair task whose T5 prompt names both columns, as all of GLUE's pair tasks do."""
    return TaskSpec(
        name=name,
        hub_config=name,
        text_fields=(first, second),
        t5_template=f"{name} {first}: {{{first}}} {second}: {{{second}}}",
        label_words=labels,
        metric=metric,
    )


def _single(name: str, labels: tuple[str, ...], metric: Metric) -> TaskSpec:
    """A single-sentence task (CoLA, SST-2)."""
    return TaskSpec(
        name=name,
        hub_config=name,
        text_fields=("sentence",),
        t5_template=f"{name} sentence: {{sentence}}",
        label_words=labels,
        metric=metric,
    )


_ENTAIL = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _single("cola", ("unacceptable", "acceptable"), Metric.MATTHEWS),
        _single("sst2", ("negative", "positive"), Metric.ACCURACY),
        _pair("mrpc", "sentence1", "sentence2", ("not_equivalent", "equivalent"), Metric.F1_ACCURACY),
        _pair("qqp", "question1", "question2", ("not_duplicate", "duplicate"), Metric.F1_ACCURACY),
        _pair("stsb", "sentence1", "sentence2", (), Metric.PEARSON_SPEARMAN),
        # LST puts the premise first and writes "hypothesis" without its colon; kept as it is, for its splits' scores.
        dataclass_replace(
            _pair("mnli", "hypothesis", "premise", ("entailment", "neutral", "contradiction"), Metric.ACCURACY),
            lst_template="mnli premise: {premise} hypothesis {hypothesis}",
        ),
        _pair("qnli", "question", "sentence", _ENTAIL, Metric.ACCURACY),
        _pair("rte", "sentence1", "sentence2", _ENTAIL, Metric.ACCURACY),
        # WNLI's hub ids are the reverse of RTE's: 0 = not_entailment, 1 = entailment.
        _pair("wnli", "sentence1", "sentence2", ("not_entailment", "entailment"), Metric.ACCURACY),
    )
}
"""All nine GLUE tasks, keyed by `TaskSpec.name`, in GLUE's order."""
assert tuple(TASKS) == TASK_NAMES, "read_cache.kinds.TASK_NAMES names the same tasks in the same order"


def get_task(name: str) -> TaskSpec:
    """Look a task up by name; GLUE's spellings ("SST-2", "STS-B") are accepted too."""
    return TASKS[task_name(name)]
