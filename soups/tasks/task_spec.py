"""What a study file says about one task (a skill or the target): where its data comes from,
how a row becomes a prompt and a completion, how answers are generated and scored.

This is the one schema of a task: the study file's `skills` and `target` sections are
mappings of these, `soups.tasks.task_data.TaskData` carries one into every trial, and the
generation and scoring defaults are read from `soups.evaluation.evaluate` /
`soups.evaluation.scoring`, never restated. Pure: importing it loads neither torch nor datasets.

    target:
      gsm_hard:
        source: reasoning-machines/gsm-hard       # hub id, file, save_to_disk folder, generated
        carve: {split: train, sizes: {validation: 200, test: rest}, seed: 0, key: input}
        preset: pal                               # soups_qa | alpaca | pal
        columns: {question: input}                # preset variable <- dataset column
        expected: target
        fewshot: {source: preset, n: 8}
        generation: {max_new_tokens: 256}
        scorer: {kind: program, abs_tol: 1.0e-3}
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from soups.evaluation.evaluate import GenerationSettings
from soups.evaluation.scoring import SCORERS, ScorerSettings

GENERATED = "generated"
ROLES = ("train", "validation", "test")
TEXT_SUFFIXES = (".txt", ".md")
_GENERATION, _SCORER = GenerationSettings(), ScorerSettings()


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CarveSpec(Strict):
    """Carve train / validation / test out of one split of the source: each role gets a row
    count, a fraction of the rows, or `rest`; rows are ordered by a seeded hash of `key` (a
    column; default the whole row), so the carve is deterministic and rows with the same
    key land in the same split."""

    split: str = "train"
    sizes: dict[Literal["train", "validation", "test"], int | float | Literal["rest"]]
    seed: int = 0
    key: str | None = None

    @field_validator("sizes")
    @classmethod
    def _valid_sizes(cls, sizes: dict) -> dict:
        for role, size in sizes.items():
            if size == "rest":
                continue
            if isinstance(size, bool) or size < 0 or (isinstance(size, float) and size >= 1):
                raise ValueError(f"size of {role!r} must be a row count >= 0, a fraction in "
                                 f"(0, 1) or 'rest', got {size!r}")
        if list(sizes.values()).count("rest") > 1:
            raise ValueError("at most one split takes the 'rest' of the rows")
        return sizes


class FewShotSpec(Strict):
    """Demonstrations put before each evaluation prompt (never in training): `preset` (the
    preset's own demos), `task` (this task's own rows of `split`, which must be train), or a
    dataset (file, folder, hub id) rendered with this task's templates."""

    n: int = Field(ge=0)
    source: str = "preset"
    split: str = "train"
    sampler: Literal["first_n", "seeded"] = "first_n"
    seed: int = 0

    @model_validator(mode="after")
    def _demos_not_from_evaluated_rows(self) -> FewShotSpec:
        if self.source == "task" and self.split != "train":
            raise ValueError(f"few-shot demos from the task itself must come from its train "
                             f"split, got split {self.split!r}: demos from the evaluated "
                             "rows would leak the answers")
        return self


class GenerationSpec(Strict):
    """How answers are generated (`soups.evaluation.evaluate.GenerationSettings`). `max_new_tokens`
    None: the study's `evaluation.max_new_tokens`; `stop` None: the preset's stop
    sequences (the embedded question/answer markers without a preset)."""

    max_new_tokens: int | None = Field(default=None, ge=1)
    stop: list[str] | None = None
    temperature: float = Field(default=_GENERATION.temperature, ge=0)  # 0: greedy
    top_p: float = Field(default=_GENERATION.top_p, gt=0, le=1)
    seed: int = _GENERATION.seed


class ScorerSpec(Strict):
    """How an answer is scored (`soups.evaluation.scoring`); a bare kind name is accepted too."""

    kind: str = _SCORER.kind
    extract: Literal["auto", "answer_is", "hashes", "last", "regex"] = _SCORER.extract
    pattern: str | None = _SCORER.pattern  # for extract: regex, one group
    abs_tol: float | None = Field(default=_SCORER.abs_tol, ge=0)
    rel_tol: float | None = Field(default=_SCORER.rel_tol, ge=0)
    entry: str = _SCORER.entry  # the function a program answer must define
    case_sensitive: bool = _SCORER.case_sensitive
    timeout_s: float = Field(default=_SCORER.timeout_s, gt=0)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        if kind not in SCORERS:
            raise ValueError(f"unknown scorer {kind!r}; scorers: {sorted(SCORERS)}")
        return kind

    @model_validator(mode="after")
    def _pattern_for_regex(self) -> ScorerSpec:
        if (self.extract == "regex") != (self.pattern is not None):
            raise ValueError("extract: regex takes a `pattern` (one group), and only it does")
        return self

    def settings(self) -> ScorerSettings:
        return ScorerSettings(**self.model_dump())


class TaskSpec(Strict):
    """One task of a study. `generated` tasks are the embedded default's (their rows are
    already prompts and completions); any other source is rendered from its columns."""

    source: str = GENERATED  # `generated`, a data file, a save_to_disk folder or a hub id
    name: str | None = None  # hub dataset config (`openai/gsm8k`: `main`)
    revision: str | None = None  # hub revision (branch, tag or commit)
    data_files: list[str] | dict[str, str | list[str]] | None = None
    text: bool | None = None  # raw text, chunked (None: by suffix, .txt / .md)
    splits: dict[Literal["train", "validation", "test"], str] = Field(
        default_factory=lambda: {role: role for role in ROLES})
    carve: CarveSpec | None = None
    filter: str | None = None  # a Jinja boolean expression over the columns
    columns: dict[str, str] = Field(default_factory=dict)  # template name <- dataset column
    preset: str | None = None  # soups_qa | alpaca | pal (soups.data.prompts.PRESETS)
    prompt: str | None = None  # a column or a Jinja template; None: the preset's
    completion: str | None = None
    expected: str | None = None  # the reference answer (column or template)
    key: str | None = None  # decontamination key (column or template); None: the prompt
    # auto: the base's chat template where its tokenizer has one (an instruct model), else
    # plain prompts; tokenizer: the template, required; none: plain prompts
    chat_template: Literal["auto", "none", "tokenizer"] = "auto"
    fewshot: FewShotSpec | None = None
    generation: GenerationSpec = GenerationSpec()
    scorer: ScorerSpec = ScorerSpec()

    @field_validator("source", mode="before")
    @classmethod
    def _source_given(cls, source):
        if source is None or source == "":
            raise ValueError("set the task's source: a data file, a save_to_disk folder, a "
                             "hub dataset id, or `generated`")
        return source

    @field_validator("scorer", mode="before")
    @classmethod
    def _scorer_shorthand(cls, scorer):
        return {"kind": scorer} if isinstance(scorer, str) else scorer

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        if self.preset is not None:
            from soups.data.prompts import PRESETS  # lazy: jinja2

            if self.preset not in PRESETS:
                raise ValueError(f"unknown preset {self.preset!r}; presets: {sorted(PRESETS)}")
        if self.source == GENERATED:
            rendered = {k: getattr(self, k) for k in ("preset", "prompt", "completion",
                                                       "expected", "carve", "filter")}
            given = sorted(k for k, v in rendered.items() if v is not None) + (
                ["columns"] if self.columns else [])
            if given:
                raise ValueError(f"a generated task has its own rows; {given[0]!r} applies "
                                 "to datasets only")
        if self.carve is None and self.splits.get("validation") is not None \
                and self.splits.get("validation") == self.splits.get("test"):
            raise ValueError(f"splits: validation and test are the same split "
                             f"{self.splits['test']!r}: the search would select on the rows "
                             "it is tested on; carve them apart (carve: ...)")
        if self.is_text and self.scorer.kind != "loss":
            raise ValueError(f"a raw-text task is scored by its loss: set scorer: loss, not "
                             f"{self.scorer.kind!r}")
        if self.fewshot and self.fewshot.n and self.fewshot.source == "preset" \
                and self.preset is None:
            raise ValueError("fewshot.source 'preset' needs a preset; name the task's own "
                             "rows (source: task) or a dataset")
        return self

    @property
    def is_text(self) -> bool:
        if self.text is not None:
            return self.text
        return self.source.lower().endswith(TEXT_SUFFIXES)

    @property
    def generated(self) -> bool:
        return self.source == GENERATED

    def generation_settings(self, max_new_tokens: int, batch_size: int) -> GenerationSettings:
        """The task's generation settings; the study's `evaluation` gives the length and
        batch size unless the task sets its own length, the preset gives the stops."""
        from soups.data.prompts import PRESETS  # lazy: jinja2

        stop = self.generation.stop
        if stop is None:
            stop = PRESETS[self.preset].stop if self.preset else _GENERATION.stop
        return GenerationSettings(
            max_new_tokens=self.generation.max_new_tokens or max_new_tokens,
            stop=tuple(stop), temperature=self.generation.temperature,
            top_p=self.generation.top_p, seed=self.generation.seed, batch_size=batch_size)
