"""Evaluation: the model on the trial's device (`resolve_device`, `load_model`), batched
generation with the KV cache and stop sequences (`GenerationSettings`, `generate`), then
per-task scoring (`soups.evaluation.scoring`: numbers, programs executed in the sandbox, exact
text), or, for a `loss` task, the completions' loss under teacher forcing (`completion_loss`).
`evaluate_rows` does one task; its records are the generations artifact (`records_jsonl`).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from soups.adapters import check_fits
from soups.errors import SoupsError
from soups.evaluation.adapter_kinds import kind_of
from soups.evaluation.sandbox import BWRAP
from soups.evaluation.scoring import LOSS, SCORERS, ScorerSettings, mean
from soups.lazy import lazy
from soups.names import ACCURACY, task_metric

torch = lazy("torch")  # imported on first use: the study spec reads the defaults below

STOP_MARKERS = ("\n### Question", "\n### Answer")
MAX_NEW_TOKENS = 96  # generation length per answer (the study's `evaluation` default)
BATCH_SIZE = 32  # prompts per generation batch
DTYPES = ("float32", "bfloat16", "float16")
LOSS_METRIC, PERPLEXITY = "loss", "perplexity"
OnBatch = Callable[[list[int]], None]  # told the input indices of each batch before it runs


class EvaluationError(SoupsError):
    """An evaluation setting that cannot be honoured here (the message names it)."""


# Device and dtype -----------------------------------------------------------------------


def resolve_device(device: str = "auto", dtype: str = "auto"
                   ) -> tuple[torch.device, torch.dtype]:
    """(torch.device, torch.dtype) to evaluate on. `auto` device: the GPU when there is one
    (Ray gives a trial its GPU through CUDA_VISIBLE_DEVICES), else the CPU; `auto` dtype:
    bfloat16 on a CUDA device that supports it, float16 on an older one, float32 on the
    CPU. `cpu`, `cuda`, `cuda:N` and the DTYPES names are honoured as given."""
    where = _resolve_device(device)
    return where, _resolve_dtype(dtype, where)


def _resolve_device(device: str):
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = str(device).partition(":")
    if kind == "cpu" and not index:
        return torch.device("cpu")
    if kind != "cuda" or (index and not index.isdigit()):
        raise EvaluationError(f"unknown device {device!r}; devices: auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise EvaluationError(f"device {device!r}: CUDA is not available on this machine "
                              "(use device auto or cpu)")
    if index and int(index) >= torch.cuda.device_count():
        raise EvaluationError(f"device {device!r}: this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    return torch.device(device)


def _resolve_dtype(dtype, device):
    if isinstance(dtype, torch.dtype):  # callers that already hold one
        return dtype
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise EvaluationError(f"unknown dtype {dtype!r}; dtypes: auto, {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def load_model(model_dir, adapter_dir=None, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer): the base model, with a PEFT adapter merged into it for fast
    generation, on `device` in `dtype` (`resolve_device`). The merge is done in float32,
    then the merged weights are cast. An adapter folder of another kind (`adapter_kinds`: the
    mixture of LoRA experts) cannot be merged: its layers are installed on the cast model instead
    (experts and routers on its device, in float32 on a half-precision base). ModelError /
    AdapterError / MoeError name a folder that is not a model, or not an adapter of it;
    EvaluationError a device or dtype not available."""
    from soups.training.base_model import load_pretrained  # lazy: torch

    where, precision = resolve_device(device, dtype)  # before the load: fail in a second
    tokenizer, model = load_pretrained(model_dir, torch.float32)
    kind = kind_of(adapter_dir)
    if adapter_dir is not None and kind is None:
        from peft import PeftModel  # lazy: peft

        check_fits(adapter_dir, model)
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model = model.to(device=where, dtype=precision)
    if kind is not None:
        kind.install(model, adapter_dir)  # after the cast, which would cast the routers too
    model.eval()
    return model, tokenizer


# Generation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = MAX_NEW_TOKENS
    stop: tuple[str, ...] = STOP_MARKERS  # a row ends at the first of these in its text
    temperature: float = 0.0  # 0: greedy; above: sampling
    top_p: float = 1.0  # sampling: nucleus mass kept
    seed: int = 0  # sampling: torch.manual_seed before each batch
    batch_size: int = BATCH_SIZE

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))  # a YAML list is fine too
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise EvaluationError(f"max_new_tokens must be an integer >= 1, not "
                                  f"{self.max_new_tokens!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise EvaluationError(f"batch_size must be an integer >= 1, not "
                                  f"{self.batch_size!r}")
        if not self.temperature >= 0:
            raise EvaluationError(f"temperature must be >= 0, not {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise EvaluationError(f"top_p must be in (0, 1], not {self.top_p!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise EvaluationError(f"stop sequences must be non-empty strings, not "
                                  f"{self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def params(self, prefix: str = "") -> dict:
        """The settings as a flat dict (MLflow run parameters), keys `prefix + name`; the
        stop sequences as one JSON list, so their newlines stay visible."""
        values = asdict(self)
        values["stop"] = json.dumps(list(self.stop))
        return {prefix + k: v for k, v in values.items()}


class _StopOnText:
    """Stopping criterion: a row is done once its new text contains a stop sequence.
    Decodes only the generated tokens, so a stop sequence that would straddle the prompt
    and the answer (transformers' `stop_strings` matches across it) does not end a row."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_width: int):
        self.tokenizer, self.stop, self.prompt_width = tokenizer, tuple(stop), prompt_width
        self.done: set[int] = set()

    def __call__(self, input_ids, scores=None, **kwargs):
        for row, ids in enumerate(input_ids[:, self.prompt_width:].tolist()):
            if row not in self.done and _first_stop(
                    self.tokenizer.decode(ids, skip_special_tokens=True), self.stop) >= 0:
                self.done.add(row)
        return torch.tensor([row in self.done for row in range(input_ids.shape[0])],
                            dtype=torch.bool, device=input_ids.device)


def _first_stop(text: str, stop: Sequence[str]) -> int:
    """Where the earliest stop sequence starts in `text`, or -1."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else -1


def _cut(text: str, stop: Sequence[str] = STOP_MARKERS) -> str:
    """The answer: `text` up to its earliest stop sequence (a model that keeps writing a
    next question), stripped."""
    end = _first_stop(text, stop)
    return (text if end < 0 else text[:end]).strip()


def _left_padded(encoded: Sequence[list[int]], pad_id: int):
    """(input ids, attention mask), rows padded on the left to the longest."""
    width = max(len(ids) for ids in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, tokens in enumerate(encoded):
        ids[row, width - len(tokens):] = torch.tensor(tokens)
        mask[row, width - len(tokens):] = 1
    return ids, mask


def _sampling_args(settings: GenerationSettings) -> dict:
    if settings.greedy:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p,
            "top_k": 0}  # no top-k cut: exactly temperature and top_p


def generate(model, tokenizer, prompts: Sequence[str],
             settings: GenerationSettings = GenerationSettings(),
             on_batch: OnBatch | None = None) -> list[str]:
    """Completions of `prompts` (final strings) in batches (left-padded, KV cache), in input
    order, each cut at its earliest stop sequence. Prompts are sorted by length first so a
    batch wastes little on padding; sampling reseeds before each batch, so the same prompts
    and settings give the same texts. (`generate` of transformers runs without autograd.)
    `on_batch`, when given, is called with the indices in `prompts` of each batch's rows,
    in row order, just before that batch runs (`soups.evaluation.resident` picks each row's
    adapter)."""
    from transformers import StoppingCriteriaList  # lazy: transformers

    model.eval()
    # The same BOS rule as training (soups.training.text_batches, imported here: it loads torch).
    from soups.training.text_batches import pad_token_id, prompt_ids  # lazy: torch

    encoded = _fit_context(model, [prompt_ids(tokenizer, p) for p in prompts],
                           settings.max_new_tokens)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    device, pad_id = next(model.parameters()).device, pad_token_id(tokenizer)
    for start in range(0, len(order), settings.batch_size):
        rows = order[start : start + settings.batch_size]
        ids, mask = _left_padded([encoded[i] for i in rows], pad_id)
        criteria = StoppingCriteriaList(
            [_StopOnText(tokenizer, settings.stop, ids.shape[1])] if settings.stop else [])
        if not settings.greedy:
            torch.manual_seed(settings.seed)
        if on_batch is not None:
            on_batch(rows)
        generated = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device),
            max_new_tokens=settings.max_new_tokens, use_cache=True,
            stopping_criteria=criteria, pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id, **_sampling_args(settings))
        for r, i in enumerate(rows):
            text = tokenizer.decode(generated[r, ids.shape[1]:], skip_special_tokens=True)
            outputs[i] = _cut(text, settings.stop)
    return outputs


def _fit_context(model, encoded: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Prompts cut from the left to leave room for the answer in the model's context (as
    lm-evaluation-harness does: a long few-shot prompt loses its first demos, never the
    question); the first token (BOS) is kept. Says how many were cut."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    room = context - max_new_tokens if isinstance(context, int) else None
    if room is None or all(len(ids) <= room for ids in encoded):
        return encoded
    if room < 2:
        raise EvaluationError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt "
                              f"in the model's context of {context} tokens")
    cut = sum(len(ids) > room for ids in encoded)
    warnings.warn(f"{cut} of {len(encoded)} prompts are longer than the model's context "
                  f"({context} tokens) minus max_new_tokens ({max_new_tokens}): cut from the "
                  "left, the first demos go first", stacklevel=3)
    return [ids if len(ids) <= room else ids[:1] + ids[len(ids) - room + 1:]
            for ids in encoded]


# Loss -----------------------------------------------------------------------------------


def completion_nll(model, tokenizer, rows: Sequence[dict], batch_size: int,
                    max_length: int | None = None,
                    on_batch: OnBatch | None = None) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, token count) of each row's completion (and EOS)
    given its prompt, under teacher forcing; `on_batch` as in `generate`."""
    # lazy: torch
    from soups.training.text_batches import IGNORE_INDEX, collate, encode_example, pad_token_id

    max_length = max_length or getattr(model.config, "max_position_embeddings", None) or 2048
    encoded = [encode_example(tokenizer, row["prompt"], row["completion"], max_length,
                              loss_on="completion") for row in rows]
    device, totals = next(model.parameters()).device, []
    model.eval()
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size], pad_token_id(tokenizer))
        if on_batch is not None:
            on_batch(list(range(start, min(start + batch_size, len(encoded)))))
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
        labels = batch["labels"][:, 1:].to(device)  # token t is predicted at position t - 1
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
            reduction="none")  # float32: a bfloat16 log-softmax loses the small losses
        counts = (labels != IGNORE_INDEX).sum(dim=1)
        totals += list(zip(nll.sum(dim=1).tolist(), counts.tolist(), strict=True))
    return totals


def completion_loss(model, tokenizer, rows: Sequence[dict], batch_size: int = BATCH_SIZE,
                    max_length: int | None = None,
                    on_batch: OnBatch | None = None) -> list[float]:
    """Each row's mean negative log-likelihood per completion token (EOS included) given its
    prompt; NaN for a row whose prompt leaves no completion token within `max_length`
    (default: the model's context length). `on_batch` as in `generate`."""
    totals = completion_nll(model, tokenizer, rows, batch_size, max_length, on_batch)
    return [total / count if count else math.nan for total, count in totals]


def mean_completion_loss(model, tokenizer, rows: Sequence[dict], batch_size: int = BATCH_SIZE,
                         max_length: int | None = None) -> float:
    """The token-weighted mean of `completion_loss`: every completion token of every row
    counts once (a loss task's `loss`); NaN when no row has a completion token."""
    return _token_mean(completion_nll(model, tokenizer, rows, batch_size, max_length))


def _token_mean(totals: Sequence[tuple[float, int]]) -> float:
    tokens = sum(count for _, count in totals)
    return sum(total for total, _ in totals) / tokens if tokens else math.nan


# Tasks ----------------------------------------------------------------------------------


@dataclass
class TaskScores:
    task: str
    n: int
    accuracy: float | None  # None for a loss task: nothing is judged right or wrong
    partial: dict[str, float]  # the scorer's partial scores; `loss`, `perplexity` for loss
    seconds: float
    records: list[dict] = field(default_factory=list)

    def metrics(self, split: str | None = None) -> dict[str, float]:
        """Accuracy (unless None) and partial scores by name: `task_metric(split, task,
        metric)` keys (`validation/math/accuracy`), or `<task>/<metric>` without a split."""
        scores = {ACCURACY: self.accuracy} if self.accuracy is not None else {}
        scores.update(self.partial)
        return {task_metric(split, self.task, k) if split else f"{self.task}/{k}": v
                for k, v in scores.items()}


def scorer_of(task: str, rows: Sequence[dict]) -> ScorerSettings:
    """The rows' one `scorer` column value as settings (`final_number` for no rows)."""
    kinds = {row["scorer"] for row in rows}
    if len(kinds) > 1:
        raise EvaluationError(f"task {task}: rows mix scorers {sorted(kinds)}")
    kind = kinds.pop() if kinds else "final_number"
    if kind not in SCORERS:
        raise EvaluationError(f"task {task}: unknown scorer {kind!r}; known: {sorted(SCORERS)}")
    return ScorerSettings(kind=kind)


def _loss_scores(model, tokenizer, rows: list[dict], prompts: list[str],
                 batch_size: int, on_batch: OnBatch | None = None) -> tuple[list[dict], dict]:
    """Records and the token-weighted mean `loss` and its `perplexity` of a loss task."""
    scored = [{**row, "prompt": prompt} for row, prompt in zip(rows, prompts, strict=True)]
    totals = completion_nll(model, tokenizer, scored, batch_size, on_batch=on_batch)
    return loss_records(rows, prompts, totals)


def loss_records(rows: list[dict], prompts: list[str], totals: list[tuple[float, int]]
                  ) -> tuple[list[dict], dict]:
    """`_loss_scores` from the rows' (summed NLL, token count) totals."""
    records = [{"prompt": prompt, "output": "", "extracted": None,
                "reference": row["completion"], "correct": None,
                "loss": total / count if count else math.nan, "tokens": count}
               for row, prompt, (total, count) in zip(rows, prompts, totals, strict=True)]
    loss = _token_mean(totals)
    return records, {LOSS_METRIC: loss, PERPLEXITY: math.exp(loss)}  # exp(NaN) is NaN


def evaluate_rows(model, tokenizer, task: str, rows: Sequence[dict],
                  prompts: Sequence[str] | None = None,
                  generation: GenerationSettings = GenerationSettings(),
                  scorer: ScorerSettings | None = None, sandbox: str = BWRAP,
                  on_batch: OnBatch | None = None) -> TaskScores:
    """Score `rows` (one task): generate from `prompts` (default: the rows' `prompt`
    column) and score with `scorer` (default: the rows' one `scorer` column value), programs
    run in `sandbox` (`soups.evaluation.sandbox.SANDBOXES`); a `loss` scorer generates nothing and
    reports the completions' loss and perplexity (batches of `generation.batch_size`), with
    accuracy None. Records: the scorer's, with `prompt` the final prompt. `on_batch` is
    told each batch's row indices (`generate`)."""
    rows = list(rows)
    prompts = [row["prompt"] for row in rows] if prompts is None else list(prompts)
    if len(prompts) != len(rows):
        raise EvaluationError(f"task {task}: {len(prompts)} prompts for {len(rows)} rows")
    scorer = scorer or scorer_of(task, rows)
    start = time.perf_counter()
    if scorer.kind == LOSS:
        records, partial = _loss_scores(model, tokenizer, rows, prompts, generation.batch_size,
                                        on_batch)
        accuracy = None
    else:
        answers = generate(model, tokenizer, prompts, generation, on_batch)
        records, partial, accuracy = answer_records(rows, prompts, answers, scorer, sandbox)
    return TaskScores(task=task, n=len(rows), accuracy=accuracy, partial=partial,
                      seconds=time.perf_counter() - start, records=records)


def answer_records(rows: list[dict], prompts: list[str], answers: list[str],
                    scorer: ScorerSettings, sandbox: str) -> tuple[list[dict], dict, float]:
    """(records, partial scores, accuracy) of generated answers under `scorer`."""
    records, partial = SCORERS[scorer.kind].score(rows, answers, scorer, sandbox)
    records = [{**record, "prompt": prompt}
               for record, prompt in zip(records, prompts, strict=True)]
    return records, partial, mean(record["correct"] for record in records)


def json_safe(value):
    """`value` with non-finite floats as strings ("nan", "inf"): strict JSON everywhere."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def records_jsonl(records: Sequence[dict]) -> str:
    """The records as JSON lines, one per record (the generations artifact); values JSON
    cannot carry are written as their str()."""
    return "".join(json.dumps(json_safe(record), default=str, allow_nan=False) + "\n"
                   for record in records)
