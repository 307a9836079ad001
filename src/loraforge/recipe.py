"""The recipe: one YAML file that says model, data, LoRA, training and tracking.

`load_recipe(path, overrides)` reads the YAML, applies `--set key.path=value` overrides and validates
the result into a typed `Recipe`. Every problem becomes a `UserError` whose one line names the file,
the YAML line, the key path, and the nearest valid key or the allowed values.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loraforge.errors import UserError
from loraforge.preference_recipe import DPO_ONLY, PreferenceSection, check

Auto = Literal["auto"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelSection(_Strict):
    name_or_path: str = Field(
        description="Hub id, local directory, a .gguf file, or pkg:<python package>/<file> for a file a package ships."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto = bf16 on Ampere+ GPUs, fp16 on older GPUs, fp32 on CPU."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="auto = SDPA where transformers has it for the model, eager otherwise (Gemma-2)."
    )
    trust_remote_code: bool = Field(False, description="Run code shipped with the model. Off unless you turn it on.")
    adapter_from: str | None = Field(None, description="A finished SFT run directory: its adapter is where a "
                                     "preference run (training.method dpo/orpo) starts (pref_recipe.py).")


class QuantizationSection(_Strict):
    mode: Literal["none", "4bit", "8bit"] = Field("none", description="none = LoRA; 4bit = QLoRA; 8bit = LLM.int8.")
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"


class LoraSection(_Strict):
    r: int = Field(16, ge=1, le=4096)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init: Literal["default", "gaussian", "olora", "pissa", "loftq"] = Field(
        "default", description="LoRA initialisation: default (A random, B zero), gaussian, olora (QR of the base "
        "weight; also over a 4-bit/8-bit base), pissa (SVD of the base weight; full-precision base only), "
        "loftq (not offered: see quant.check_lora_init).")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("give at least one module name, or 'all-linear'")
        return v


DataFormat = Literal["auto", "alpaca", "messages", "sharegpt", "prompt-completion", "text", "preference"]


class DataSource(_Strict):
    path: str | None = Field(None, description="Local .jsonl/.json/.parquet/.csv file (relative to the recipe).")
    hub: str | None = Field(None, description="A dataset id on the hub (needs network).")
    subset: str | None = None
    split: str = "train"
    max_samples: int | None = Field(None, ge=1)
    format: DataFormat = "auto"

    @model_validator(mode="after")
    def _one_origin(self):
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of 'path' (a local file) or 'hub' (a dataset id)")
        return self


class DataSection(_Strict):
    sources: list[DataSource] = Field(min_length=1)
    eval_sources: list[DataSource] = Field(default_factory=list)
    eval_split: float = Field(0.0, ge=0, lt=1, description="Share of the records held out for eval.")
    system_prompt: str | None = None
    chat_template: str | None = Field(None, description="Jinja template text or a .jinja file, replacing the model's.")
    max_seq_length: int | Auto = Field(1024, description="Tokens per sample; auto = the longest sample, capped by the model.")
    packing: bool = False
    loss_on: Literal["assistant", "all"] = Field("assistant", description="Which tokens of a chat carry the loss.")

    @field_validator("max_seq_length")
    @classmethod
    def _positive(cls, v):
        if v != "auto" and v < 8:
            raise ValueError("must be 'auto' or an integer >= 8")
        return v


class TrainingSection(_Strict):
    method: Literal["sft", "dpo", "orpo"] = Field(
        "sft", description="sft, or a preference objective on {prompt, chosen, rejected} pairs: dpo, orpo (pref_recipe.py).")
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1, description="> 0 overrides epochs.")
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    lr_scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
    ] = "cosine"
    warmup: float = Field(0.03, ge=0, description="A share of the steps if < 1, else a number of steps.")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    optimizer: Literal[
        "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd"
    ] = "adamw_torch"
    seed: int = 42
    global_batch_size: int = Field(16, ge=1, description="Sequences per optimizer step, summed over all processes.")
    micro_batch_size: int | Auto = "auto"
    gradient_accumulation_steps: int | Auto = "auto"
    gradient_checkpointing: bool | Auto = "auto"
    loss_head: Literal["auto", "plain", "fused"] = Field(
        "auto", description="LM head for the loss: plain (labelled positions only; fast on CPUs) or trl's chunked "
        "fused head (never holds the logits; GPUs). auto = plain on the CPU, fused on GPUs.")
    logging_steps: int = Field(10, ge=1)
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (default: at the end).")
    save_steps: int | None = Field(None, ge=1, description="Checkpoint every N steps (default: at the end only).")
    save_total_limit: int = Field(2, ge=1)
    device: Literal["auto", "cpu", "gpu"] = Field("auto", description="cpu forces CPU training, even with a GPU.")
    on_nonfinite: Literal["stop", "skip"] = Field("stop", description="A NaN/inf loss or gradient: stop, or skip the update.")
    max_skipped_steps: int = Field(10, ge=0, description="With on_nonfinite: skip, stop after this many bad steps.")

    @field_validator("micro_batch_size", "gradient_accumulation_steps")
    @classmethod
    def _positive(cls, v):
        if v != "auto" and v < 1:
            raise ValueError("must be 'auto' or an integer >= 1")
        return v


class TrackingSection(_Strict):
    backend: Literal["none", "wandb", "tensorboard"] | list[Literal["wandb", "tensorboard"]] = Field(
        "none", description="none, wandb, tensorboard, or a list of both."
    )

    @property
    def backends(self) -> list[str]:
        b = self.backend
        return [] if b == "none" else [b] if isinstance(b, str) else list(dict.fromkeys(b))
    project: str = "loraforge"
    entity: str | None = None
    run_name: str | None = None
    tags: list[str] = Field(default_factory=list)
    group: str | None = None


class SamplesSection(_Strict):
    """Prompts answered by the base and the fine-tuned model after training, printed side by side."""

    prompts: list[str] = Field(default_factory=list)
    max_new_tokens: int = Field(64, ge=1, le=4096)


class Recipe(_Strict):
    model: ModelSection
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection
    training: TrainingSection = Field(default_factory=TrainingSection)
    output_dir: str = Field(description="The run directory: adapter, resolved recipe, plan, metrics, checkpoints.")
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    samples: SamplesSection = Field(default_factory=SamplesSection)
    preference: PreferenceSection | None = Field(None, description="Keys of training.method dpo / orpo (pref_recipe.py).")

    # Where the recipe came from; relative data paths resolve against it. Not part of the YAML.
    _source: Path | None = None

    @property
    def source(self) -> Path | None:
        return self._source

    def resolve_path(self, p: str) -> Path:
        path = Path(p).expanduser()
        if not path.is_absolute() and self._source is not None and not path.exists():
            candidate = self._source.parent / path
            if candidate.exists():
                return candidate
        return path

    def to_dict(self) -> dict[str, Any]:
        """Every field, defaults included: what `plan` shows and the run directory keeps. An SFT recipe leaves
        out the preference keys (its dump is what it was before they existed)."""
        out = self.model_dump(mode="json")
        if self.training.method == "sft":
            out.pop("preference", None)
            out["training"].pop("method", None)
            if out["model"].get("adapter_from") is None:
                out["model"].pop("adapter_from", None)
        else:
            out["preference"] = out.get("preference") or PreferenceSection().model_dump(mode="json")
            if self.training.method == "orpo":
                out["preference"] = {k: v for k, v in out["preference"].items() if k not in DPO_ONLY}
        return out


# --------------------------------------------------------------------------------------------------
# Loading, overrides, and error messages
# --------------------------------------------------------------------------------------------------


def _line_index(node: yaml.Node, prefix: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Map every key path in a composed YAML document to its 1-based line number."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = prefix + (key_node.value,)
            out[path] = key_node.start_mark.line + 1
            _line_index(value_node, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[prefix + (i,)] = item.start_mark.line + 1
            _line_index(item, prefix + (i,), out)
    return out


def _parse_yaml(text: str, where: str) -> tuple[dict, dict[tuple, int]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}{line}: not valid YAML ({problem}); check indentation and quoting") from None
    if data is None:
        raise UserError(f"{where}: the recipe is empty; start from recipes/quickstart.yaml")
    if not isinstance(data, dict):
        raise UserError(f"{where}: a recipe is a mapping of sections (model:, data:, training: ...), not a {type(data).__name__}")
    return data, (_line_index(node) if node is not None else {})


def _fields_at(path: tuple) -> list[str]:
    """The valid keys of the section at `path` (for 'did you mean')."""
    model: type[BaseModel] | None = Recipe
    for part in path:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = _model_of(field.annotation)
    return list(model.model_fields) if model is not None else []


def _model_of(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _format_error(err: dict, where: str, lines: dict[tuple, int], set_keys: set[tuple]) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "literal[", "int", "bool", "float", "list["))))
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    origin = where
    if loc in set_keys or any(loc[: len(k)] == k for k in set_keys):
        origin = "--set"
    else:
        probe = loc
        while probe and probe not in lines:
            probe = probe[:-1]
        if probe in lines:
            origin = f"{where}:{lines[probe]}"
    kind = err["type"]
    if kind == "extra_forbidden":
        valid = _fields_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys here: {', '.join(valid)}"
        return f"{origin}: {dotted}: unknown key; {hint}"
    if kind == "missing":
        return f"{origin}: {dotted}: required key is missing; add it (see recipes/quickstart.yaml)"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    got_s = f" (got {got!r})" if got is not None and not isinstance(got, (dict, list)) else ""
    return f"{origin}: {dotted}: {msg}{got_s}"


def _apply_override(data: dict, assignment: str) -> tuple:
    if "=" not in assignment:
        raise UserError(f"--set {assignment}: expected KEY.PATH=VALUE, e.g. --set training.learning_rate=1e-4")
    key, raw = assignment.split("=", 1)
    parts = tuple(p for p in key.strip().split(".") if p)
    if not parts:
        raise UserError(f"--set {assignment}: empty key; e.g. --set training.learning_rate=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part) if isinstance(node, dict) else None
        if nxt is None:
            nxt = {}
            node[part] = nxt
        if not isinstance(nxt, dict):
            raise UserError(f"--set {assignment}: '{'.'.join(parts[: i + 1])}' is not a section")
        node = nxt
    node[parts[-1]] = value
    return parts


def recipe_from_dict(
    data: dict, where: str = "<recipe>", lines: dict | None = None, set_keys: set | None = None
) -> Recipe:
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        raise UserError(_format_error(errors[0], where, lines or {}, set_keys or set())) from None

    given = {k: (list(v) if isinstance(v, dict) else []) for k, v in data.items() if k in ("preference", "model")}
    broken = check(recipe, given)
    if broken is not None:
        err = {"loc": broken[0], "type": "value_error", "msg": broken[1]}
        raise UserError(_format_error(err, where, lines or {}, set_keys or set()))
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = Path(path)
    if path.is_dir():
        hint = next((f" such as {p}" for p in sorted(path.glob("*.yaml"))[:1]), "")
        raise UserError(f"{path}: is a directory; give the recipe file inside it{hint}")
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found; shipped recipes are listed by `loraforge recipes`")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save the recipe as UTF-8") from None
    data, lines = _parse_yaml(text, str(path))
    set_keys = {_apply_override(data, o) for o in overrides}
    recipe = recipe_from_dict(data, str(path), lines, set_keys)
    recipe._source = path.resolve()
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True)
