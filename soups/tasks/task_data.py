"""A task's rows, as every stage reads them: loaded from the task's source, filtered, carved,
rendered through its templates (and its chat template), decontaminated.

`TaskData` is small and picklable (Ray sends it to every trial); the rows are rebuilt where
they are read, from the same inputs, so every process sees the same rows. A row has the
columns of the embedded tasks (`soups.data.generated`): `key`, `prompt`, `completion` (the exact
training text, chat template applied), `scorer`, `function`, `calls`, `expected`, plus
`raw_prompt` / `raw_completion` (before any chat template: what evaluation prompts and
few-shot demos are built from).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace

from soups.data.datasets import DatasetError, as_number
from soups.data.generated import question_of
from soups.data.sources import (
    Carve,
    carve_rows,
    chunk_text,
    decontaminate,
    filter_rows,
    load_source,
    normalise_key,
    source_fingerprint,
)
from soups.tasks.task_spec import TaskSpec


@dataclass(frozen=True)
class TaskData:
    name: str
    spec: TaskSpec
    location: str  # generated tasks: their save_to_disk folder; else the spec's source
    model_dir: str | None = None  # its tokenizer: chat templates, raw-text blocks
    max_length: int = 192  # raw-text block length (the fine-tune's max_length)
    exclude: frozenset[str] = frozenset()  # normalised keys dropped from train (decontamination)

    def __hash__(self) -> int:  # the spec's dicts are not hashable; its JSON is
        return hash((self.name, self.spec.model_dump_json(), self.location, self.model_dir,
                     self.max_length, self.exclude))

    # -- rows ---------------------------------------------------------------------------
    def rows(self, role: str, limit: int | None = None) -> list[dict]:
        """The rows of `role` (train / validation / test), the first `limit` when given;
        train rows whose key is in `exclude` are left out."""
        rows = self._rendered(role)
        if role == "train" and self.exclude:
            rows, _ = decontaminate(rows, set(self.exclude), key_of=lambda r: r["key"])
        return rows[:limit] if limit else rows

    def removed_overlap(self) -> int:
        """How many train rows the decontamination removed."""
        if not self.exclude:
            return 0
        return decontaminate(self._rendered("train"), set(self.exclude),
                             key_of=lambda r: r["key"])[1]

    def keys(self, role: str) -> set[str]:
        """The normalised keys of `role`'s rows (what decontamination compares)."""
        return {normalise_key(r["key"]) for r in self._rendered(role)}

    def _rendered(self, role: str) -> list[dict]:
        """The role's rows before decontamination, rendered once per process (every stage
        asks again: the report, stage 1, each trial's evaluation); copies, so a caller
        that changes a row changes only its own."""
        return [dict(r) for r in _render_once(replace(self, exclude=frozenset()), role)]

    def uses_chat(self) -> bool:
        """Whether prompts go through the base's chat template (training and evaluation):
        `tokenizer`, or `auto` with a base whose tokenizer has one. Raw text never does."""
        mode = self.spec.chat_template
        if mode == "none" or self.spec.is_text:
            return False
        if mode == "tokenizer":
            return True
        return (self.model_dir is not None
                and getattr(self.tokenizer(), "chat_template", None) is not None)

    def _render(self, role: str) -> list[dict]:
        spec = self.spec
        if spec.generated:
            split = spec.splits.get(role)
            # copies: the split is cached for every TaskData of this folder
            rows = [dict(r) for r in _generated_split(self.location, split)] if split else []
            if self.uses_chat():  # the question alone is the user's turn
                for row in rows:
                    row["raw_prompt"] = question_of(row["prompt"])
                    row["raw_completion"] = row["completion"]
        else:
            raw = self._raw(role)
            if spec.is_text:
                return self._text_rows(raw)
            templates = _Templates.of(spec, self.name)
            rows = [templates.row(r) for r in raw]
        if self.uses_chat():
            from soups.data.prompts import PromptFormat  # lazy: jinja2

            chat, tokenizer = PromptFormat(chat=True), self.tokenizer()
            for row in rows:
                row["prompt"], row["completion"] = chat.training_text(
                    tokenizer, row["raw_prompt"], row["raw_completion"])
        return rows

    def _raw(self, role: str) -> list[dict]:
        """The source's rows of `role`, filtered, carved, with the `columns` aliases."""
        spec = self.spec
        if spec.carve is not None:
            rows = _carve_once(replace(self, exclude=frozenset())).get(role, [])
        else:
            split = spec.splits.get(role)
            rows = self._filtered(split, missing_ok=role != "train") if split else []
        return [_with_aliases(r, spec.columns, self.name) for r in rows]

    def _carved(self) -> dict[str, list[dict]]:
        """Every role's rows of the carved split (one carve serves the three roles)."""
        carve = self.spec.carve
        return carve_rows(self._filtered(carve.split),
                          Carve(dict(carve.sizes), carve.seed, carve.key), f"task {self.name}")

    def _loaded(self) -> dict[str, list[dict]]:
        spec = self.spec
        return _source(spec.source, spec.name, spec.revision, _frozen(spec.data_files))

    def _filtered(self, split: str, missing_ok: bool = False) -> list[dict]:
        loaded = self._loaded()
        if split not in loaded:
            if missing_ok and len(loaded) == 1:
                # A one-split source that is not carved (a skill's text file, a training
                # set): its train role has rows, the others none (study/resolve.py refuses
                # that for the target, whose validation and test must exist).
                return []
            raise DatasetError(f"task {self.name}: source {self.spec.source} has no split "
                               f"{split!r}; splits: {sorted(loaded)}")
        rows = loaded[split]
        if self.spec.filter:
            rows = filter_rows(rows, self.spec.filter, f"task {self.name}")
        return rows

    def _text_rows(self, raw: list[dict]) -> list[dict]:
        if raw and "text" not in raw[0]:
            raise DatasetError(f"task {self.name}: a raw-text task needs a `text` column; "
                               f"columns: {sorted(raw[0])}")
        blocks = chunk_text(self.tokenizer(), [r["text"] for r in raw], self.max_length)
        return [{"key": b, "prompt": "", "completion": b, "raw_prompt": "",
                 "raw_completion": b, "scorer": "loss", "function": "", "calls": "[]",
                 "expected": "[]"} for b in blocks]

    # -- evaluation ---------------------------------------------------------------------
    def eval_prompts(self, rows: list[dict]) -> list[str]:
        """The prompt each row is generated from: few-shot demos, then the row's prompt,
        through the chat template when the task uses one."""
        from soups.data.prompts import PromptFormat  # lazy: jinja2

        chat = self.uses_chat()
        demos = self.demos()
        if not chat and not demos:
            return [r.get("raw_prompt", r["prompt"]) for r in rows]
        fmt = PromptFormat(chat=chat, demos=tuple(demos))
        tokenizer = self.tokenizer() if chat else None  # plain prompts need no tokenizer
        return [fmt.generation_prompt(tokenizer, r.get("raw_prompt", r["prompt"]))
                for r in rows]

    def demos(self) -> list[tuple[str, str]]:
        """The few-shot (prompt, completion) pairs, before any chat template."""
        fewshot = self.spec.fewshot
        if fewshot is None or fewshot.n == 0:
            return []
        from soups.data.prompts import PRESETS, select_demos  # lazy: jinja2

        if fewshot.source == "preset":
            preset = PRESETS[self.spec.preset]
            templates = _Templates.preset(preset, self.name)
            pool = [templates.row(dict(d)) for d in preset.demos]
        elif fewshot.source == "task":
            pool = self._rendered_plain("train")
        else:
            loaded = _source(fewshot.source, None, None, None)
            if fewshot.split not in loaded:
                raise DatasetError(f"task {self.name}: few-shot source {fewshot.source} has "
                                   f"no split {fewshot.split!r}; splits: {sorted(loaded)}")
            templates = _Templates.of(self.spec, self.name)
            pool = [templates.row(_with_aliases(r, self.spec.columns, self.name))
                    for r in loaded[fewshot.split]]
        chosen = select_demos(pool, fewshot.n, fewshot.sampler, fewshot.seed)
        return [(d["raw_prompt"], d["raw_completion"]) for d in chosen]

    def _rendered_plain(self, role: str) -> list[dict]:
        if self.spec.generated:
            return [{**r, "raw_prompt": r["prompt"], "raw_completion": r["completion"]}
                    for r in self._rendered(role)]
        templates = _Templates.of(self.spec, self.name)
        return [templates.row(r) for r in self._raw(role)]

    def generation(self, evaluation: dict):
        """`soups.evaluation.evaluate.GenerationSettings` from the task and the study's
        `evaluation`."""
        return self.spec.generation_settings(evaluation["max_new_tokens"],
                                             evaluation["batch_size"])

    def scorer(self):
        return self.spec.scorer.settings()

    def tokenizer(self):
        if self.model_dir is None:
            raise DatasetError(f"task {self.name}: its chat template or raw text needs the "
                               "base model's tokenizer, and no model was given")
        return load_tokenizer(self.model_dir)

    # -- provenance ---------------------------------------------------------------------
    def fingerprint(self) -> dict:
        """What identifies the task's data (for MLflow): the source's fingerprint and how
        it was carved and filtered."""
        spec = self.spec
        if spec.generated:
            return {"kind": "generated", "path": self.location}
        out = source_fingerprint(spec.source, spec.name, spec.revision, spec.data_files,
                                 loaded=self._loaded())
        if spec.carve is not None:
            out["carve"] = spec.carve.model_dump()
            out["carved"] = {role: len(self._raw(role)) for role in spec.carve.sizes}
        if spec.filter:
            out["filter"] = spec.filter
        return out


class _Templates:
    """A task's templates, compiled once: prompt, completion, reference answer and key."""

    def __init__(self, task: str, prompt: str, completion: str, expected: str | None,
                 key: str, scorer: str, entry: str):
        from soups.data.prompts import Template  # lazy: jinja2

        self.prompt = Template(prompt, task, "prompt")
        self.completion = Template(completion, task, "completion")
        self.expected = Template(expected, task, "expected") if expected else None
        self.key = Template(key, task, "key")
        self.scorer, self.entry = scorer, entry

    @classmethod
    def of(cls, spec: TaskSpec, task: str) -> _Templates:
        from soups.data.prompts import PRESETS  # lazy: jinja2

        preset = PRESETS[spec.preset] if spec.preset else None
        prompt = spec.prompt or (preset.prompt if preset else "prompt")
        completion = spec.completion or (preset.completion if preset else "completion")
        key = spec.key or (preset.key if preset and not spec.prompt else prompt)
        return cls(task, prompt, completion, spec.expected, key, spec.scorer.kind,
                   spec.scorer.entry)

    @classmethod
    def preset(cls, preset, task: str) -> _Templates:
        return cls(task, preset.prompt, preset.completion, None, preset.key, "loss", "")

    def row(self, source: dict) -> dict:
        prompt, completion = self.prompt.render(source), self.completion.render(source)
        expected = self.expected.render(source) if self.expected else ""
        program = self.scorer == "program"
        if self.scorer == "exact_match":
            reference = [expected]
        else:
            reference = [as_number(expected)] if expected else []
        return {"key": self.key.render(source), "prompt": prompt, "completion": completion,
                "raw_prompt": prompt, "raw_completion": completion, "scorer": self.scorer,
                "function": self.entry if program else "",
                "calls": json.dumps([[]]) if program else "[]",
                "expected": json.dumps(reference if self.scorer != "loss" else [])}


def _with_aliases(row: dict, columns: dict[str, str], task: str) -> dict:
    """The row with each `columns` alias (a template name) set to its dataset column."""
    if not columns:
        return row
    missing = sorted(c for c in columns.values() if c not in row)
    if missing:
        raise DatasetError(f"task {task}: columns maps to {missing[0]!r}, which is not a "
                           f"column; columns: {sorted(row)}")
    return {**row, **{alias: row[column] for alias, column in columns.items()}}


def _frozen(data_files):
    return json.dumps(data_files, sort_keys=True) if data_files is not None else None


@functools.lru_cache(maxsize=8)
def _source(source: str, name: str | None, revision: str | None, data_files: str | None
            ) -> dict[str, list[dict]]:
    """Every split of a source as lists of rows, loaded once per process."""
    files = json.loads(data_files) if data_files is not None else None
    loaded = load_source(source, name=name, revision=revision, data_files=files)
    return {split: loaded[split].to_list() for split in loaded}


@functools.lru_cache(maxsize=8)
def _carve_once(data: TaskData) -> dict[str, list[dict]]:
    return data._carved()


@functools.lru_cache(maxsize=32)
def _render_once(data: TaskData, role: str) -> tuple[dict, ...]:
    return tuple(data._render(role))


@functools.lru_cache(maxsize=16)
def _generated_split(location: str, split: str) -> tuple[dict, ...]:
    import datasets  # lazy: datasets

    loaded = datasets.load_from_disk(location)
    if split not in loaded:
        raise DatasetError(f"generated data {location}: no split {split!r}; splits: "
                           f"{sorted(loaded)}")
    return tuple(loaded[split].to_list())


@functools.lru_cache(maxsize=4)
def load_tokenizer(model_dir: str):
    """The tokenizer of a base model folder or hub id, loaded once per process."""
    from transformers import AutoTokenizer  # lazy: transformers

    from soups.training.base_model import model_ref  # lazy: torch

    return AutoTokenizer.from_pretrained(model_ref(model_dir))
