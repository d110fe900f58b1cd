"""The model card (README.md) of an exported KptLLM folder, generated from eval.py's evaluation JSON.

The YAML front matter (tags, datasets, metrics, `model-index`) is written by huggingface_hub's
`ModelCardData`/`EvalResult`, never by hand; the body is a Jinja template rendered by
`ModelCard.from_template`. Every number and every claim about the results (above or below a
baseline) comes from the evaluation JSON, so a card cannot say more than the evaluation measured.

Evaluation JSON (written by `eval.py`):

    {"model": "<path>", "benchmark": "embedded" | "mp100" | "ap10k",
     "summary": [{"task": "Visual-prompt keypoint detection", "task_type": "keypoint-detection",
                  "dataset": {"name": ..., "type": ..., "split": ..., "config": ...},
                  "metric": {"name": "PCK@0.2", "type": "pck", "value": 16.78},      # percent
                  "baselines": {"support-copy": 29.12, "mean-position": 16.79},
                  "setting": "100 fixed episodes, 805 keypoints"}, ...],
     "details": {...}}
"""

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from safetensors import safe_open

# The Hub's task list (@huggingface/tasks) has "keypoint-detection" (ViTPose, SuperPoint use it).
# KptLLM's two detection tasks answer with named (x, y) points, which is what that tag promises;
# "image-text-to-text" would only describe the semantic task's text answer and would advertise a
# chat widget that cannot pass a support image and keypoint prompts.
PIPELINE_TAG = "keypoint-detection"
TAGS = ["custom_code", "kptllm", "keypoint-detection", "multimodal", "pose-estimation"]
PAPER_TITLE = "KptLLM: Unveiling the Power of Large Language Model for Keypoint Comprehension"
PROJECT_PAGE = "https://kptllm.github.io"

# Metrics reported in percent (0-100): a value outside that range is a malformed JSON, not a result.
PERCENT_METRIC_TYPES = ("pck", "oks_ap", "accuracy")
# Within this many points a model and a baseline are reported as on par rather than above/below.
ON_PAR_POINTS = 0.5

BASELINE_DESCRIPTIONS = {
    "support-copy": "copies the support keypoints' normalized positions in the support crop to the query crop",
    "mean-position": "predicts each keypoint name's mean normalized position over the training instances",
    "matching peer": "a POMNet/CapeFormer-style matcher (correlation heatmap of the support keypoint's feature over "
                     "the query features, soft-argmax near the peak, transformer refinement) on the same stage-0 "
                     "vision modules, trained on the same categories",
    "cosine probe (KptLLM's z_p, z_q)": "puts each keypoint at the query patch whose token z_q is most similar "
                                        "(cosine) to the prompt token z_p: what the LLM's inputs already hold",
}

# The usage snippet pins the code it runs: this line is what `set_card_revision` rewrites after a push.
REVISION_LINE = re.compile(r'^revision = "(?P<revision>[^"]*)"(?P<comment>.*)$', re.MULTILINE)
PINNED_COMMENT = "  # the commit holding these weights and code: remote code runs on your machine, pin what you reviewed"
UNPINNED_REVISION = "main"
UNPINNED_COMMENT = (
    "  # not pinned yet (card written before upload): replace with a commit hash from the repo's history, "
    "since remote code runs on your machine"
)


class EvalJsonError(ValueError):
    """The evaluation JSON does not have the schema eval.py writes; the message names file and field."""


@dataclass(frozen=True)
class ResultEntry:
    """One row of the evaluation summary: a task on a dataset, the model's metric and the baselines."""

    task: str
    task_type: str
    dataset_name: str
    dataset_type: str
    dataset_split: str | None
    dataset_config: str | None
    metric_name: str
    metric_type: str
    metric_value: float
    baselines: dict[str, float] = field(default_factory=dict)
    setting: str | None = None


@dataclass(frozen=True)
class EvalReport:
    model: str
    benchmark: str
    summary: list[ResultEntry]
    source: str


# -- reading the evaluation JSON ------------------------------------------------------------

def _field(mapping: Any, key: str, where: str, kinds: type | tuple[type, ...], optional: bool = False) -> Any:
    if not isinstance(mapping, dict):
        raise EvalJsonError(f"{where} must be an object, got {type(mapping).__name__}")
    path = f"{where}.{key}" if where else key
    if mapping.get(key) is None:
        if optional:
            return None
        raise EvalJsonError(f"{path} is missing")
    value = mapping[key]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    # bool is an int subclass, but true/false is never a metric value
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise EvalJsonError(f"{path} must be {' or '.join(kind.__name__ for kind in kinds)}, got {value!r}")
    if isinstance(value, str) and not value.strip():
        raise EvalJsonError(f"{path} must not be empty")
    return value


def _number(mapping: dict, key: str, where: str, percent: bool) -> float:
    value = float(_field(mapping, key, where, (int, float)))
    if not math.isfinite(value):
        raise EvalJsonError(f"{where}.{key} must be a finite number, got {value}")
    if percent and not 0.0 <= value <= 100.0:
        raise EvalJsonError(f"{where}.{key} = {value} is not a percentage in [0, 100]")
    return value


def parse_eval_report(data: Any, source: str = "evaluation JSON") -> EvalReport:
    """Checks `data` against eval.py's schema; errors are `EvalJsonError` naming `source` and the field."""
    try:
        if not isinstance(data, dict):
            raise EvalJsonError(f"the top level must be an object, got {type(data).__name__}")
        model = _field(data, "model", "", str)
        benchmark = _field(data, "benchmark", "", str)
        rows = _field(data, "summary", "", list)
        if not rows:
            raise EvalJsonError("summary is empty: there is no result to report")
        summary = []
        for index, row in enumerate(rows):
            where = f"summary[{index}]"
            dataset = _field(row, "dataset", where, dict)
            metric = _field(row, "metric", where, dict)
            metric_type = _field(metric, "type", f"{where}.metric", str)
            percent = metric_type in PERCENT_METRIC_TYPES
            baselines_raw = _field(row, "baselines", where, dict, optional=True) or {}
            baselines = {
                str(name): _number(baselines_raw, name, f"{where}.baselines", percent) for name in baselines_raw
            }
            summary.append(
                ResultEntry(
                    task=_field(row, "task", where, str),
                    task_type=_field(row, "task_type", where, str),
                    dataset_name=_field(dataset, "name", f"{where}.dataset", str),
                    dataset_type=_field(dataset, "type", f"{where}.dataset", str),
                    dataset_split=_field(dataset, "split", f"{where}.dataset", str, optional=True),
                    dataset_config=_field(dataset, "config", f"{where}.dataset", str, optional=True),
                    metric_name=_field(metric, "name", f"{where}.metric", str),
                    metric_type=metric_type,
                    metric_value=_number(metric, "value", f"{where}.metric", percent),
                    baselines=baselines,
                    setting=_field(row, "setting", where, str, optional=True),
                )
            )
    except EvalJsonError as error:
        raise EvalJsonError(f"{source}: {error}") from None
    return EvalReport(model=model, benchmark=benchmark, summary=summary, source=source)


def load_eval_report(path: str | Path) -> EvalReport:
    path = Path(path)
    if not path.is_file():
        raise EvalJsonError(f"{path}: no such evaluation JSON (eval.py writes it; run it first)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise EvalJsonError(f"{path}: not valid JSON ({error})") from None
    return parse_eval_report(data, str(path))


# -- facts about the model folder -----------------------------------------------------------

@dataclass(frozen=True)
class ModelFacts:
    num_parameters: int
    vision: str
    language: str
    prompt_feature_extractor: str


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted({model_dir / name for name in json.loads(index.read_text())["weight_map"].values()})
    return [model_dir / "model.safetensors"]


def count_parameters(model_dir: Path) -> int:
    """Parameters in the folder's safetensors files, from their headers (no tensor is loaded)."""
    total = 0
    for path in _weight_files(model_dir):
        with safe_open(path, framework="pt") as weights:
            for name in weights.keys():
                total += math.prod(weights.get_slice(name).get_shape())
    return total


def read_model_facts(model_dir: Path) -> ModelFacts:
    config = json.loads((model_dir / "config.json").read_text())
    vision, text = config.get("vision_config", {}), config.get("text_config", {})
    return ModelFacts(
        num_parameters=count_parameters(model_dir),
        vision=(
            f"{vision.get('model_type', '?')}, {vision.get('num_hidden_layers', '?')} layers, width "
            f"{vision.get('hidden_size', '?')}, {vision.get('image_size', '?')} px input, patch {vision.get('patch_size', '?')}"
        ),
        language=(
            f"{text.get('model_type', '?')}, {text.get('num_hidden_layers', '?')} layers, width "
            f"{text.get('hidden_size', '?')}, vocabulary {text.get('vocab_size', '?')}"
        ),
        prompt_feature_extractor=config.get("prompt_feature_extractor", "cross_attention"),
    )


def read_training_metadata(model_dir: Path) -> dict[str, Any]:
    """What train.py left beside the model folder (`OUTPUT_DIR/model`): its report, Trainer state, arguments.

    train.py writes `OUTPUT_DIR/results.json` (model_args, data_args, global_step, train_runtime_s)
    and `OUTPUT_DIR/trainer_state.json`; `training_args.json` is read too if present (in either folder).
    """
    metadata: dict[str, Any] = {}
    run_dir = model_dir.parent
    report_path = run_dir / "results.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        if isinstance(report, dict) and "model_args" in report:  # train.py's report, not another results file
            metadata["report"] = report
    state_path = run_dir / "trainer_state.json"
    if state_path.is_file():
        metadata["trainer_state"] = json.loads(state_path.read_text())
    for folder in (model_dir, run_dir):
        if (folder / "training_args.json").is_file():
            metadata["training_args"] = json.loads((folder / "training_args.json").read_text())
            break
    return metadata


# -- rendering ------------------------------------------------------------------------------

TRAINING_ARG_KEYS = (
    "learning_rate", "weight_decay", "lr_scheduler_type", "warmup_steps", "max_steps", "num_train_epochs",
    "per_device_train_batch_size", "gradient_accumulation_steps", "bf16", "seed",
)
MODEL_ARG_KEYS = ("preset", "model_name_or_path", "prompt_feature_extractor", "use_lora", "lora_r", "lora_alpha")
DATA_ARG_KEYS = ("dataset", "split", "task_mix", "num_shots", "identify_then_detect", "crop_padding")


def _format_value(value: Any) -> str:
    return f"`{value}`" if not isinstance(value, float) else f"`{value:g}`"


def trained_from_scratch(metadata: dict[str, Any], base_model: str | None) -> bool | None:
    """True/False when known; None when no base model was named and train.py's record does not tell."""
    if base_model:
        return False
    model_args = metadata.get("report", {}).get("model_args", {})
    if not model_args:
        return None
    # the tiny preset builds every module from random weights; smol loads SmolLM2, paper loads LLaVA
    return model_args.get("preset") == "tiny" and not model_args.get("model_name_or_path")


def training_lines(metadata: dict[str, Any], base_model: str | None, training_notes: str | None) -> list[str]:
    lines = []
    report = metadata.get("report", {})
    model_args, data_args = report.get("model_args", {}), report.get("data_args", {})
    from_scratch = trained_from_scratch(metadata, base_model)
    if base_model:
        lines.append(f"Initialised from [`{base_model}`](https://huggingface.co/{base_model}).")
    elif from_scratch:
        lines.append("No base model: every weight was trained from random initialisation (train.py's `tiny` preset).")
    else:
        lines.append("No base model was named at export (`--base_model`).")
    if report:
        step_text = f"{report['global_step']} optimizer steps" if "global_step" in report else "training"
        runtime = report.get("train_runtime_s")
        runtime_text = f" in {runtime / 60:.1f} min" if isinstance(runtime, (int, float)) else ""
        lines.append(f"Trained with this repository's `train.py`: {step_text}{runtime_text}.")
    if not model_args.get("use_lora", True):  # LoRA hyper-parameters of a run without LoRA mean nothing
        model_args = {key: value for key, value in model_args.items() if not key.startswith("lora_")}
    for title, values, keys in (
        ("Model arguments", model_args, MODEL_ARG_KEYS),
        ("Data arguments", data_args, DATA_ARG_KEYS),
        ("Training arguments", metadata.get("training_args", {}), TRAINING_ARG_KEYS),
    ):
        shown = [f"{key}={_format_value(values[key])}" for key in keys if key in values]
        if shown:
            lines.append(f"{title}: " + ", ".join(shown) + ".")
    state = metadata.get("trainer_state", {})
    losses = [entry["loss"] for entry in state.get("log_history", []) if "loss" in entry]
    if losses:
        lines.append(f"Training loss: {losses[0]:.4g} at the first log, {losses[-1]:.4g} at the last ({len(losses)} logs).")
    if training_notes:
        lines.append(training_notes.strip())
    if not report and not state and "training_args" not in metadata and not training_notes:
        lines.append(
            "No training record was found beside the model folder (train.py writes `results.json` and "
            "`trainer_state.json` next to `model/`), and none was given with `--training_notes`."
        )
    return lines


def bullets(lines) -> str:
    return "\n".join(f"- {line}" for line in lines)


def _points(value: float) -> str:
    return f"{value:.2f}"


def comparison_sentence(entry: ResultEntry, model_label: str) -> str | None:
    """How the model's number compares with each baseline of the same evaluation, from the numbers alone."""
    if not entry.baselines:
        return None
    parts = []
    for name, value in entry.baselines.items():
        difference = entry.metric_value - value
        if abs(difference) <= ON_PAR_POINTS:
            parts.append(f"on par with {name} ({_points(value)})")
        elif difference < 0:
            parts.append(f"below {name} ({_points(value)}, {_points(-difference)} points lower)")
        else:
            parts.append(f"above {name} ({_points(value)}, {_points(difference)} points higher)")
    where = ", ".join(x for x in (entry.dataset_name, entry.dataset_split, entry.dataset_config) if x)
    sentence = f"{entry.task} ({where}): {model_label} scores {_points(entry.metric_value)} {entry.metric_name}, " + "; ".join(parts) + "."
    best_name = max(entry.baselines, key=entry.baselines.get)
    if entry.metric_value < entry.baselines[best_name] - ON_PAR_POINTS:
        sentence += (
            f" It does not beat the {best_name} baseline yet: treat these weights as a working pipeline, "
            "not as a usable detector for this task."
        )
    return sentence


def results_table(report: EvalReport, model_label: str) -> str:
    baseline_names = list(dict.fromkeys(name for entry in report.summary for name in entry.baselines))
    header = ["Task", "Dataset", "Split / config", "Setting", "Metric", model_label, *baseline_names]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in report.summary:
        split = " / ".join(x for x in (entry.dataset_split, entry.dataset_config) if x) or "–"
        cells = [
            entry.task, entry.dataset_name, split, entry.setting or "–", entry.metric_name,
            f"**{_points(entry.metric_value)}**",
            *(_points(entry.baselines[name]) if name in entry.baselines else "–" for name in baseline_names),
        ]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows)


def limitation_lines(report: EvalReport, facts: ModelFacts, from_scratch: bool | None, model_label: str) -> list[str]:
    lines = [sentence for entry in report.summary if (sentence := comparison_sentence(entry, model_label))]
    if report.benchmark == "embedded":
        lines.append(
            "It was evaluated on the repository's procedurally generated embedded benchmark (synthetic glyph "
            "images in MP-100 / AP-10K layout) only; these numbers say nothing about natural images."
        )
    if facts.num_parameters < 50_000_000:
        lines.append(
            f"It is a small model ({facts.num_parameters / 1e6:.2f}M parameters) sized for CPU training; the paper's "
            "model is LLaVA-1.5-7B."
        )
    if from_scratch:
        lines.append("Without a pretrained base it only knows the keypoint names and image style of its training data.")
    lines.append(
        "Loading runs this repository's Python code (`trust_remote_code=True`): pin `revision` to a commit you "
        "have reviewed."
    )
    lines.append(
        "One call handles one object instance: pass its box as `query_bbox=[x, y, w, h]` (the whole image "
        "is used otherwise); coordinates are regressed in the square crop around that box."
    )
    return lines


def usage_snippet(repo_id: str, revision: str | None) -> str:
    revision_line = f'revision = "{revision}"{PINNED_COMMENT}' if revision else f'revision = "{UNPINNED_REVISION}"{UNPINNED_COMMENT}'
    return f'''from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline

repo_id = "{repo_id}"
{revision_line}
query = Image.open("query.jpg").convert("RGB")      # the image to find keypoints in
support = Image.open("support.jpg").convert("RGB")  # an example of the same kind of object
support_keypoints = [[40, 30], [60, 52]]            # (x, y) pixels on the support image

# the pipeline: support keypoints -> their names, positions on the query (pixels) and scores
detector = pipeline("keypoint-comprehension", model=repo_id, revision=revision, trust_remote_code=True)
print(detector(query=query, support=support, kpts=support_keypoints))
print(detector(query=query, kpt_names=["left eye", "nose"], task="textual"))  # textual prompt

# the model and processor: several query images and boxes in one call, VitPose-style results
processor = AutoProcessor.from_pretrained(repo_id, revision=revision, trust_remote_code=True)
model = AutoModel.from_pretrained(repo_id, revision=revision, trust_remote_code=True).eval()
inputs = processor(query=[query, query], query_bbox=[None, [[0, 0, 60, 50]]], support=support, kpts=support_keypoints)
outputs = model.detect_keypoints(**inputs)
for boxes in processor.post_process_keypoint_detection(outputs):  # per image, one dict per box
    for result in boxes:
        print(result["names"], result["keypoints"], result["scores"])  # (K,) names, (K, 2) pixels, (K,) scores

# semantic understanding: what is the keypoint at (x, y) of the query?
inputs = processor(query=query, kpts=[[30, 20]], task="semantic")
print(processor.decode_names(model.detect_keypoints(**inputs).sequences))'''


def set_card_revision(card_text: str, revision: str) -> str:
    """The card with its usage snippet pinned to `revision` (after a push, the upload's commit)."""
    if len(REVISION_LINE.findall(card_text)) != 1:
        raise ValueError("the model card has no single `revision = \"...\"` line in its usage snippet to pin")
    return REVISION_LINE.sub(lambda _: f'revision = "{revision}"{PINNED_COMMENT}', card_text)


def card_revision(card_text: str) -> str | None:
    match = REVISION_LINE.search(card_text)
    return match.group("revision") if match else None


TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

KptLLM ({{ paper_title }}; [project page]({{ project_page }})) is a multimodal LLM for **semantic
keypoint comprehension** with an *identify-then-detect* answer: it first writes the keypoint's name,
then emits a `<keypoint>` token whose hidden state a small FFN regresses to (x, y). One model serves
three tasks:

- **keypoint semantic understanding**: image + a keypoint position → the keypoint's name;
- **visual-prompt keypoint detection**: query image + support image with keypoints → the same keypoints on the query;
- **textual-prompt keypoint detection**: query image + keypoint names → their positions.

This checkpoint: {{ num_parameters }} parameters; vision tower {{ vision }}; language model {{ language }};
prompt feature extractor `{{ prompt_feature_extractor }}`. The code ships with the weights
(`configuration_kptllm.py`, `modeling_kptllm.py`, `processing_kptllm.py`), hence `trust_remote_code=True`.

## Usage

```python
{{ snippet }}
```

`revision` pins the exact code and weights that `trust_remote_code=True` will run. Coordinates given
to and returned by the processor are pixels of the original images; pass `query_bbox` / `support_bbox`
(`[x, y, w, h]`) to crop one object instance. `model.generate(**inputs)` also works as for any
transformers model.

## Results

Evaluated with this repository's `eval.py` on `{{ benchmark }}` (model folder `{{ evaluated_model }}`).
Baselines were measured by the same evaluation on the same episodes.

{{ results_table }}

{{ baseline_list }}

## Training

{{ training_list }}

## Limitations

{{ limitation_list }}

## Citation

Jie Yang, Wang Zeng, Sheng Jin, Lumin Xu, Wentao Liu, Chen Qian, Ruimao Zhang. *{{ paper_title }}*.
{{ project_page }}
"""


def build_model_card(
    report: EvalReport,
    model_dir: str | Path,
    repo_id: str,
    *,
    base_model: str | None = None,
    revision: str | None = None,
    datasets: list[str] | None = None,
    license: str = "apache-2.0",
    training_notes: str | None = None,
    model_label: str = "KptLLM",
) -> ModelCard:
    """The model card of the KptLLM folder `model_dir`, evaluated in `report`, to be published as `repo_id`.

    `revision` is the commit the usage snippet pins (unknown before the first upload: the snippet then
    says so, and `set_card_revision` pins it after the push). `datasets` defaults to the dataset types
    of the evaluation summary.
    """
    model_dir = Path(model_dir)
    facts = read_model_facts(model_dir)
    metadata = read_training_metadata(model_dir)
    model_name = repo_id.split("/")[-1]
    eval_results = [
        EvalResult(
            task_type=entry.task_type,
            task_name=entry.task,
            dataset_type=entry.dataset_type,
            dataset_name=entry.dataset_name,
            dataset_split=entry.dataset_split,
            dataset_config=entry.dataset_config,
            metric_type=entry.metric_type,
            metric_name=entry.metric_name,
            metric_value=entry.metric_value,
        )
        for entry in report.summary
    ]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        tags=list(TAGS),
        license=license,
        base_model=base_model,
        datasets=datasets or list(dict.fromkeys(entry.dataset_type for entry in report.summary)),
        metrics=list(dict.fromkeys(entry.metric_type for entry in report.summary)),
        model_name=model_name,
        eval_results=eval_results,
    )
    baseline_names = dict.fromkeys(name for entry in report.summary for name in entry.baselines)
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        model_name=model_name,
        paper_title=PAPER_TITLE,
        project_page=PROJECT_PAGE,
        num_parameters=f"{facts.num_parameters / 1e6:.2f}M",
        vision=facts.vision,
        language=facts.language,
        prompt_feature_extractor=facts.prompt_feature_extractor,
        snippet=usage_snippet(repo_id, revision),
        benchmark=report.benchmark,
        evaluated_model=report.model,
        results_table=results_table(report, model_label),
        baseline_list=bullets(f"**{name}** {BASELINE_DESCRIPTIONS[name]}." for name in baseline_names if name in BASELINE_DESCRIPTIONS),
        training_list=bullets(training_lines(metadata, base_model, training_notes)),
        limitation_list=bullets(limitation_lines(report, facts, trained_from_scratch(metadata, base_model), model_label)),
    )


def extract_python_snippet(card_text: str) -> str:
    """The card's first ```python block (tests execute it)."""
    match = re.search(r"```python\n(.*?)\n```", card_text, re.DOTALL)
    if match is None:
        raise ValueError("the model card has no ```python usage block")
    return match.group(1)
