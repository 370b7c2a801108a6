"""One mixture-of-LoRA-experts run end to end, as `soups.compose.cat.run.learn_cat` is for CAT: load
the base model, attach the skill LoRAs as experts, build the skill mix, train the routers
alone, export the mixture folder (what a `lora_moe` trial calls).

The routers are trained with CAT's machinery (`soups.compose.cat.run.PreparedRun`: the base and
the skill mix; `soups.compose.cat.train.train_weights`): the same skill mix, held-out loss,
best-step selection and per-step callback. No auxiliary load-balancing loss: mergoo's LoRA
MoE has none, and with two skills an unbalanced router is a finding, not a failure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from soups.compose.cat.run import PreparedRun
from soups.compose.cat.settings import PAPER_FRACTION, PAPER_HELD_OUT
from soups.compose.cat.train import CatTrainResult, train_weights
from soups.compose.moe.folder import export_moe
from soups.compose.moe.model import MoeModel
from soups.compose.moe.settings import PAPER_MOE_TRAIN, MoeError, MoeSettings
from soups.training.train_settings import TrainSettings
from soups.training.training_loop import Encoded


def train_moe(
    model: MoeModel,
    train_encoded: Encoded,
    held_out_encoded: Encoded,
    settings: TrainSettings,
    pad_id: int,
    on_step: Callable[[dict], bool | None] | None = None,
    log: Callable[[str], None] | None = print,
) -> CatTrainResult:
    """Train the routers of `model` (base and experts frozen) and leave the best ones (lowest
    held-out loss) in it; `on_step` and the result as `soups.compose.cat.train.train_weights`."""
    if all(layer.top_k == 1 for layer in model.layers.values()):
        raise MoeError("MoE training: every module routes to one expert (top_k 1, or one "
                       "expert): its gate is a softmax over one logit, always 1, so no router "
                       "gets a gradient; use top_k >= 2")
    if log is not None:
        log(f"MoE: {model.trainable_parameters()} trainable router parameters "
            f"({len(model.layers)} routers, {len(model.adapters)} experts, top_k "
            f"{model.settings.top_k}); base model and experts frozen")
    return train_weights(model, model.router_parameters(), train_encoded, held_out_encoded,
                         settings, pad_id, on_step, log, label="MoE")


def learn_moe(
    adapter_dirs: Sequence[str | Path],
    model_dir: str | Path,
    skills: Sequence[Sequence[dict]],
    out_dir: str | Path,
    moe: MoeSettings = MoeSettings(),
    train: TrainSettings = PAPER_MOE_TRAIN,
    fraction: float | None = PAPER_FRACTION,
    count: int | None = None,
    held_out: int = PAPER_HELD_OUT,
    device: str | None = None,
    dtype: str = "auto",
    on_step: Callable[[dict], bool | None] | None = None,
    log: Callable[[str], None] | None = print,
) -> CatTrainResult:
    """Train routers mixing the LoRAs of `adapter_dirs` (one expert each) on a mix of the
    `skills` rows (prompt/completion dicts, one list per skill) and export the mixture to
    `out_dir` (`soups.compose.moe.folder`; load it with `soups.compose.moe.load_moe`). Device and
    dtype as `learn_cat` (`soups.compose.cat.run.resolve_device`): the base and experts in that
    dtype, the experts in float32 on a half-precision base, the routers always in float32."""
    moe.check_experts(len(adapter_dirs))
    run = PreparedRun.load(model_dir, skills, train, fraction, count, held_out, device, dtype,
                           label="MoE")
    model = MoeModel.attach(run.base, adapter_dirs, moe)
    if log is not None:
        log(f"MoE: {len(adapter_dirs)} LoRA experts, {len(model.layers)} wrapped modules, "
            f"{run.describe()}")
    result = train_moe(model, run.train_encoded, run.held_out_encoded, train, run.pad_id,
                       on_step, log)
    export_moe(model, out_dir, model_dir, run.summary(result, train, fraction, count))
    return result
