"""Evaluation at study speed: the base model is loaded once and stays resident, and LoRA
candidates are applied unmerged, several side by side in one batch.

`ResidentModel` holds the base model and its tokenizer. `ResidentModel.candidates(dirs)`
wraps every linear layer any of the adapters targets in a `MixedLoraLinear` holding all k
candidates' factors (None: the base model alone); `set_rows` says which candidate each
batch row uses. On exit the original layers are put back: the model is bit-identical to
what it was (`weights_digest`). `evaluate_side_by_side` scores one task for k candidates in
one pass: every (row, candidate) pair is generated (or, for a `loss` task, scored under
teacher forcing) in mixed batches, then the answers are split and scored per candidate.

A mixture of LoRA experts candidate (a `soups.compose.moe` folder: per-token gates, not one LoRA)
is evaluated on the same resident base, alone: `ResidentModel.mixture(folder)` installs its
layers for a `with` block and puts the original layers back after, and
`evaluate_side_by_side` scores each such candidate with `evaluate_rows` inside that block,
the LoRA candidates of the same call side by side as before.

The LoRA delta is PEFT's unmerged forward, operation for operation (`lora_B(lora_A(x)) *
scaling` added to the base layer's output), so one candidate gives PEFT's logits bit for
bit; a merged model (`soups.evaluation.evaluate.load_model` with an adapter) differs by rounding.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from soups.adapters import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LoraAdapter,
    LoraModule,
    check_fits,
    factor_dtype,
)
from soups.evaluation.adapter_kinds import kind_of
from soups.evaluation.evaluate import (
    EvaluationError,
    GenerationSettings,
    TaskScores,
    answer_records,
    completion_nll,
    evaluate_rows,
    generate,
    load_model,
    loss_records,
    scorer_of,
)
from soups.evaluation.sandbox import BWRAP
from soups.evaluation.scoring import LOSS, ScorerSettings

RowGroups = list[tuple[int, "torch.Tensor | None"]]  # (candidate, its rows; None: all rows)


class MixedLoraLinear(torch.nn.Module):
    """A linear layer (`base`, untouched) plus k LoRA candidates applied per batch row.

    Factors are stacked and zero-padded to the largest rank: `A` (k, r_max, in), `B`
    (k, out, r_max), on the base weight's device in its dtype, except float32 for a float16
    or bfloat16 base, as PEFT keeps them (`autocast_adapter_dtype`, its default): the input
    is cast to that dtype, the delta added, and the sum cast back to the base output's
    dtype, PEFT's order of operations. `scalings` holds each
    candidate's PEFT scaling as a Python float, multiplied after B as PEFT does. A candidate
    without this module (or the base model alone) has rank 0 and is skipped. `rows` (a long
    tensor, one candidate index per batch row) is set before each batch; None applies the
    one candidate of a k = 1 layer to every row.

    Rows are grouped by candidate and each group is computed with that candidate's factors
    cut to its own rank: F.linear with exactly PEFT's shapes, so a row's result does not
    depend on the other candidates in its batch (a padded, batched einsum would change the
    reduction length and so the rounding)."""

    def __init__(self, base: torch.nn.Module, factors: Sequence[LoraModule | None]):
        super().__init__()
        self.base = base
        weight = base.weight
        present = [f for f in factors if f is not None]
        if not present:
            raise EvaluationError("a MixedLoraLinear needs at least one candidate's factors")
        out_features, in_features = present[0].B.shape[0], present[0].A.shape[1]
        self.ranks = tuple(0 if f is None else f.rank for f in factors)
        self.scalings = tuple(0.0 if f is None else f.scaling for f in factors)
        r_max, dtype = max(self.ranks), factor_dtype(weight.dtype)
        # Plain attributes, not buffers: the model's state_dict keeps only its own tensors.
        self.A = torch.zeros(len(factors), r_max, in_features, dtype=dtype,
                             device=weight.device)
        self.B = torch.zeros(len(factors), out_features, r_max, dtype=dtype,
                             device=weight.device)
        for c, f in enumerate(factors):
            if f is not None:
                self.A[c, :f.rank] = f.A.to(dtype)
                self.B[c, :, :f.rank] = f.B.to(dtype)
        self._rows: torch.Tensor | None = None
        self._groups: RowGroups = [(0, None)] if self.ranks[0] > 0 else []

    @property
    def k(self) -> int:
        return len(self.ranks)

    @property
    def rows(self) -> torch.Tensor | None:
        return self._rows

    @rows.setter
    def rows(self, rows: torch.Tensor | None) -> None:
        self._rows = rows
        if rows is None:
            self._groups = [(0, None)] if self.ranks[0] > 0 else []
        else:  # once per batch, not per decoding step: the groups are reused by every step
            self._groups = row_groups(rows, self.ranks)

    def factors(self, candidate: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A (r, in), B (out, r), scaling) of one candidate, cut to its own rank."""
        rank = self.ranks[candidate]
        return self.A[candidate, :rank], self.B[candidate, :, :rank], self.scalings[candidate]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_rows(x.shape[0])
        result = self.base(x)
        out_dtype, x = result.dtype, x.to(self.A.dtype)
        for candidate, index in self._groups:  # one group per row: one addition per row
            a, b, scaling = self.factors(candidate)
            if index is None:  # every row: PEFT's expression exactly
                result = (result + F.linear(F.linear(x, a), b) * scaling).to(out_dtype)
            else:
                delta = F.linear(F.linear(x.index_select(0, index), a), b) * scaling
                summed = (result.index_select(0, index) + delta).to(out_dtype)
                result = result.index_copy(0, index, summed)
        return result

    def _check_rows(self, batch: int) -> None:
        if self._rows is None and self.k != 1:
            raise EvaluationError(f"{self.k} candidates are installed: set_rows before a "
                                  "forward pass")
        if self._rows is not None and self._rows.shape[0] != batch:
            raise EvaluationError(f"set_rows gave {self._rows.shape[0]} rows, the batch has "
                                  f"{batch}")


def row_groups(rows: torch.Tensor, ranks: Sequence[int]) -> RowGroups:
    """(candidate, indices of its rows) for each candidate with rows and a nonzero rank;
    indices None when the candidate has every row."""
    groups: RowGroups = []
    for candidate, rank in enumerate(ranks):
        if rank == 0:
            continue
        index = (rows == candidate).nonzero().flatten()
        if index.numel() == rows.shape[0]:
            groups.append((candidate, None))
        elif index.numel():
            groups.append((candidate, index))
    return groups


class ResidentModel:
    """The base model and tokenizer, loaded once (`soups.evaluation.evaluate.load_model`, no
    adapter) on `device` in `dtype`; `load_seconds` is what the load took. `check_restored` (a debug
    aid: it hashes every weight twice per `candidates` call) verifies on exit that the
    model's weights are bit-identical to what they were on entry."""

    def __init__(self, model_dir, device: str = "auto", dtype: str = "auto",
                 check_restored: bool = False):
        start = time.perf_counter()
        self.model, self.tokenizer = load_model(model_dir, None, device, dtype)
        self.load_seconds = time.perf_counter() - start
        self.model_dir = Path(model_dir)
        self.check_restored = check_restored
        self._wrappers: dict[str, MixedLoraLinear] = {}
        self._count = 0  # candidates installed; 0 outside `candidates`
        self._mixture = False  # inside a `mixture` block

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @contextmanager
    def candidates(self, adapter_dirs: Sequence[str | Path | None]) -> Iterator[ResidentModel]:
        """Install k = len(adapter_dirs) candidates (None: the base model alone) for the
        `with` block. Every adapter is opened and checked against the model first
        (AdapterError naming it: unsupported, unreadable, or of another model), so a refused
        one leaves nothing installed; on exit, normal or not, the original layers are back."""
        self._check_free()
        dirs = list(adapter_dirs)
        if not dirs:
            raise EvaluationError("no candidates: give at least one adapter folder or None")
        factors = self._factors_by_module(dirs)
        before = self.weights_digest() if self.check_restored else None
        try:
            self._install(factors, len(dirs))
            yield self
        finally:
            self._remove()
        self._check_digest(before, "candidates were")

    @contextmanager
    def mixture(self, folder: str | Path) -> Iterator[ResidentModel]:
        """Install the mixture of LoRA experts of `folder` (`soups.compose.moe`) on the model for
        the `with` block: its experts and routers on the base weight's device (float32 on a
        half-precision base). The folder is read and checked first (MoeError / AdapterError
        naming it), so a refused one leaves nothing installed; on exit, normal or not, the
        original layers are back."""
        kind = kind_of(folder)
        if kind is None:
            raise EvaluationError(f"{folder}: not an adapter folder of a registered kind "
                                  "(a mixture of LoRA experts); a PEFT LoRA goes through "
                                  "`candidates`")
        self._check_free()
        before = self.weights_digest() if self.check_restored else None
        self._mixture = True
        try:
            with kind.installed(self.model, folder):
                yield self
        finally:
            self._mixture = False
        self._check_digest(before, "a mixture of LoRA experts was")

    def _check_free(self) -> None:
        if self._count or self._mixture:
            raise EvaluationError("candidates are already installed on this model "
                                  "(one `candidates` or `mixture` block at a time)")

    def _check_digest(self, before: str | None, what: str) -> None:
        if before is not None and self.weights_digest() != before:
            raise EvaluationError(f"model {self.model_dir}: weights changed while {what} "
                                  "installed")

    def set_rows(self, candidate_index_per_row: Sequence[int]) -> None:
        """Which candidate (an index into the `candidates` list) each row of the next
        batches uses."""
        if not self._count:
            raise EvaluationError("set_rows outside a `candidates` block")
        rows = list(candidate_index_per_row)
        wrong = [c for c in rows if not (isinstance(c, int) and 0 <= c < self._count)]
        if wrong:
            raise EvaluationError(f"candidate index {wrong[0]!r} is not one of the "
                                  f"{self._count} installed")
        tensor = torch.tensor(rows, dtype=torch.long, device=self.device)
        for wrapper in self._wrappers.values():
            wrapper.rows = tensor

    def weights_digest(self) -> str:
        """sha256 over every parameter and buffer of the model (name, dtype, shape, bytes)
        in state_dict order."""
        digest = hashlib.sha256()
        for name, tensor in self.model.state_dict().items():
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            digest.update(raw.numpy().tobytes())
        return digest.hexdigest()

    def _factors_by_module(self, dirs: Sequence[str | Path | None]
                           ) -> dict[str, list[LoraModule | None]]:
        """Module name -> each candidate's factors there (None where it has none). An
        adapter listed twice is read once (keyed by path and file times)."""
        read: dict[tuple, dict[str, LoraModule]] = {}
        per_candidate = []
        for adapter_dir in dirs:
            if adapter_dir is None:
                per_candidate.append({})
                continue
            key = _file_key(Path(adapter_dir))
            if key not in read:
                read[key] = self._read_adapter(Path(adapter_dir))
            per_candidate.append(read[key])
        names = sorted({name for modules in per_candidate for name in modules})
        return {name: [modules.get(name) for modules in per_candidate] for name in names}

    def _read_adapter(self, path: Path) -> dict[str, LoraModule]:
        adapter = LoraAdapter.open(path)  # refuses unsupported variants, naming the adapter
        check_fits(path, self.model)
        return dict(adapter.modules())

    def _install(self, factors: dict[str, list[LoraModule | None]], count: int) -> None:
        self._count = count
        for name, per_candidate in factors.items():
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            wrapper = MixedLoraLinear(getattr(parent, child), per_candidate)
            setattr(parent, child, wrapper)
            self._wrappers[name] = wrapper

    def _remove(self) -> None:
        for name, wrapper in self._wrappers.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, wrapper.base)
        self._wrappers, self._count = {}, 0


def _file_key(path: Path) -> tuple:
    """(resolved path, modification times of its config and weights): a rewritten adapter
    is read again."""
    times = tuple((path / name).stat().st_mtime_ns if (path / name).exists() else None
                  for name in (CONFIG_FILE, WEIGHTS_FILE))
    return (path.resolve(), *times)


def evaluate_side_by_side(resident: ResidentModel, adapter_dirs: Sequence[str | Path | None],
                          task: str, rows: Sequence[dict],
                          prompts: Sequence[str] | None = None,
                          generation: GenerationSettings = GenerationSettings(),
                          scorer: ScorerSettings | None = None,
                          sandbox: str = BWRAP) -> list[TaskScores]:
    """One TaskScores per candidate (in `adapter_dirs` order, None: the base model), each
    what `evaluate_rows` gives for that candidate alone on the resident model. Every
    (row, candidate) pair runs in mixed batches of `generation.batch_size * k` pairs, a
    row's k candidates next to each other: a batch holds the same prompts, so the same
    padding, as one candidate's batch would, and greedy answers are the same. (Sampling
    draws the k candidates' tokens from one random stream: the same distribution per
    candidate, not the same samples as one at a time.) Each TaskScores' `seconds` is its
    share, total / k, of the whole (install, generation and scoring).

    A mixture of LoRA experts folder among the candidates is evaluated alone, with
    `evaluate_rows` on the resident model with its layers installed (`ResidentModel.mixture`);
    its `seconds` are its own. The other candidates run side by side as above."""
    rows = list(rows)
    prompts = [row["prompt"] for row in rows] if prompts is None else list(prompts)
    if len(prompts) != len(rows):
        raise EvaluationError(f"task {task}: {len(prompts)} prompts for {len(rows)} rows")
    scorer = scorer or scorer_of(task, rows)
    dirs = list(adapter_dirs)
    results: list[TaskScores | None] = [None] * len(dirs)
    kinds = [kind_of(d) for d in dirs]  # one look at each folder
    loras = [i for i, kind in enumerate(kinds) if kind is None]
    if loras:
        scores = _loras_side_by_side(resident, [dirs[i] for i in loras], task, rows, prompts,
                                     generation, scorer, sandbox)
        for i, score in zip(loras, scores, strict=True):
            results[i] = score
    for i in (i for i, kind in enumerate(kinds) if kind is not None):
        with resident.mixture(dirs[i]):
            results[i] = evaluate_rows(resident.model, resident.tokenizer, task, rows, prompts,
                                       generation, scorer, sandbox)
    return results


def _loras_side_by_side(resident: ResidentModel, adapter_dirs: list[str | Path | None],
                        task: str, rows: list[dict], prompts: list[str],
                        generation: GenerationSettings, scorer: ScorerSettings,
                        sandbox: str) -> list[TaskScores]:
    k = len(adapter_dirs)
    wide = replace(generation, batch_size=generation.batch_size * max(k, 1))
    start = time.perf_counter()
    with resident.candidates(adapter_dirs):
        def pick_candidates(pair_indices: list[int]) -> None:
            resident.set_rows([pair % k for pair in pair_indices])  # pair = row * k + c

        if scorer.kind == LOSS:
            results = _side_by_side_loss(resident, rows, prompts, k, wide, pick_candidates)
        else:
            results = _side_by_side_answers(resident, rows, prompts, k, wide, scorer, sandbox,
                                            pick_candidates)
    seconds = (time.perf_counter() - start) / k
    return [TaskScores(task=task, n=len(rows), accuracy=accuracy, partial=partial,
                       seconds=seconds, records=records)
            for records, partial, accuracy in results]


def _pairs(values: list, k: int) -> list:
    """Each value k times in a row: pair p = row * k + candidate."""
    return [value for value in values for _ in range(k)]


def _side_by_side_answers(resident, rows, prompts, k, settings, scorer, sandbox, on_batch
                          ) -> list[tuple[list[dict], dict, float]]:
    answers = generate(resident.model, resident.tokenizer, _pairs(prompts, k), settings,
                       on_batch)
    return [answer_records(rows, prompts, answers[c::k], scorer, sandbox) for c in range(k)]


def _side_by_side_loss(resident, rows, prompts, k, settings, on_batch
                       ) -> list[tuple[list[dict], dict, None]]:
    scored = [{**row, "prompt": prompt} for row, prompt in zip(rows, prompts, strict=True)]
    totals = completion_nll(resident.model, resident.tokenizer, _pairs(scored, k),
                             settings.batch_size, on_batch=on_batch)
    return [(*loss_records(rows, prompts, totals[c::k]), None) for c in range(k)]
