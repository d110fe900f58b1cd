"""Export a trained KptLLM folder as the exact folder a user would push to the Hub, and push it.

    python -m hub.export --model runs/tiny/model --eval_json outputs/eval/results.json \\
        --output_dir hub_export/kptllm-tiny [--repo_id user/kptllm-tiny] [--base_model ...] \\
        [--push] [--dry_run] [--overwrite]

The export copies, from the model folder, only what a model repo holds: safetensors weights (any
pickle-based file — .bin, .pt, .pkl, ... — is refused), the remote-code files, config.json
(with an `auto_map` for AutoConfig, AutoModel and AutoProcessor, and the "keypoint-comprehension"
pipeline under `custom_pipelines`), the processor and tokenizer
files and generation_config.json, and writes the model card (README.md) from the evaluation JSON.
The folder is built in a staging directory and checked there (every required file present, every
`auto_map` target defined in the folder, and, with `--load_check`, loading with
AutoConfig/AutoModel/AutoProcessor `trust_remote_code=True` offline in a process that cannot
import this repository) before it replaces `--output_dir`; a non-empty, different `--output_dir`
is only replaced with `--overwrite`.

`--dry_run` lists every file, its size and the target repo, and makes no network call. `--push`
uploads with `HfApi.create_repo` + `upload_folder` (the repo then mirrors the folder exactly) and
pins the card's usage snippet to the upload's commit in a second commit.
"""

import ast
import filecmp
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from huggingface_hub import HfApi, ModelCard, get_token, is_offline_mode
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open
from transformers import HfArgumentParser

import modeling_kptllm
from modeling_kptllm import KptLlmConfig, KptLlmForKeypointComprehension, KptLlmProcessor
from modeling_kptllm.modeling_kptllm import CUSTOM_PIPELINES, PIPELINE_FILE

from .model_card import EvalJsonError, build_model_card, load_eval_report, set_card_revision


def _auto_map_target(cls: type) -> str:
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"  # "modeling_kptllm.KptLlmFor..."


# config.json's auto_map also names AutoProcessor: the Hub's "Use this model" snippets read config.json.
MODEL_AUTO_MAP = {
    "AutoConfig": _auto_map_target(KptLlmConfig),
    "AutoModel": _auto_map_target(KptLlmForKeypointComprehension),
    "AutoProcessor": _auto_map_target(KptLlmProcessor),
}
PROCESSOR_AUTO_MAP = {"AutoProcessor": _auto_map_target(KptLlmProcessor)}
# the auto classes' modules, the flat files they import relatively (save_pretrained copies those too) and
# the pipeline that config.json's custom_pipelines names
REMOTE_CODE_FILES = tuple(sorted(
    {f"{target.split('.')[0]}.py" for target in MODEL_AUTO_MAP.values()} | {"decoding_kptllm.py", PIPELINE_FILE}
))
REPO_CODE_DIR = Path(modeling_kptllm.__file__).resolve().parent

# What a model repo holds, besides the remote code and README.md. Everything else in the model
# folder (logs, pictures, optimizer states) is left out of the export.
MODEL_FILES = (
    "config.json", "generation_config.json", "processor_config.json", "preprocessor_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "model.safetensors", "model.safetensors.index.json",
)
SHARD_PATTERN = "model-*-of-*.safetensors"
REQUIRED_FILES = ("config.json", "generation_config.json", "processor_config.json", "tokenizer_config.json", "README.md")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # one of them
# Formats that unpickle on load (arbitrary code execution): never part of an export.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
CARD_FILE = "README.md"


class ExportError(RuntimeError):
    """The model folder cannot be exported, or the export is not what a Hub repo must hold."""


class PushError(RuntimeError):
    """The push cannot start (no token, offline, bad repo id): nothing was uploaded."""


# -- collecting and writing -----------------------------------------------------------------

def check_hub_id(value: str, flag: str, error: type[Exception] = ExportError, namespaced: bool = True) -> None:
    """`value` must be a Hub id (validate_repo_id's rules; 'user-or-org/name' when `namespaced`: a repo we
    create needs its owner, while older models and datasets such as 'gpt2' have none); raises `error` naming `flag`."""
    try:
        validate_repo_id(value)
        if namespaced and "/" not in value:
            raise HFValidationError("it must be 'user-or-org/name'")
    except HFValidationError as problem:
        raise error(f"{flag} {value!r} is not a valid Hub repo id: {problem}") from None


def check_export_arguments(repo_id: str | None, base_model: str | None, datasets: list[str] | None,
                           revision: str | None, license: str) -> None:
    """Every Hub-facing argument checked before anything is written: a bad one must not leave a folder behind."""
    if repo_id is not None:
        check_hub_id(repo_id, "--repo_id")
    if base_model is not None:
        check_hub_id(base_model, "--base_model", namespaced=False)
    for dataset in datasets or []:
        check_hub_id(dataset, "--datasets entry", namespaced=False)
    for flag, value in (("--revision", revision), ("--license", license)):
        if value is not None and (not value.strip() or any(c.isspace() for c in value)):
            raise ExportError(f"{flag} {value!r} must be a single word without spaces")


def is_pickle_file(path: Path) -> bool:
    return path.name.lower().endswith(PICKLE_SUFFIXES)


def collect_model_files(model_dir: Path, code_from_repo: bool = False) -> tuple[dict[str, Path], list[str]]:
    """(export name -> source file, names left out) for `model_dir`; refuses pickle files and missing pieces."""
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir} is not a model folder (no config.json); train.py writes OUTPUT_DIR/model")
    entries = sorted(p for p in model_dir.iterdir())
    pickles = [p.name for p in entries if p.is_file() and is_pickle_file(p)]
    if pickles:
        raise ExportError(
            f"{model_dir} holds pickle-based files {pickles}: loading them can run arbitrary code, so an export "
            "ships safetensors only. Re-save the model with save_pretrained (safetensors is its default) "
            "and delete these files; nothing was exported."
        )
    files: dict[str, Path] = {}
    left_out = []
    for path in entries:
        if path.is_file() and (path.name in MODEL_FILES or fnmatch.fnmatch(path.name, SHARD_PATTERN)):
            files[path.name] = path
        elif path.name not in REMOTE_CODE_FILES:
            left_out.append(path.name + ("/" if path.is_dir() else ""))
    for name in REMOTE_CODE_FILES:
        source = REPO_CODE_DIR / name if code_from_repo else model_dir / name
        if not source.is_file():
            raise ExportError(
                f"{source} is missing: the export needs the remote code the weights were saved with "
                "(save_pretrained copies it); pass --code_from_repo to ship this repository's modeling_kptllm/ instead"
            )
        files[name] = source
    if "model.safetensors" not in files and "model.safetensors.index.json" not in files:
        raise ExportError(f"{model_dir} has no safetensors weights (model.safetensors or model.safetensors.index.json)")
    for name in REQUIRED_FILES:
        if name != CARD_FILE and name not in files:
            raise ExportError(f"{model_dir} lacks {name}: save the model and the processor with save_pretrained")
    if not any(name in files for name in TOKENIZER_FILES):
        raise ExportError(f"{model_dir} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): save the processor with save_pretrained")
    return files, left_out


def code_differing_from_repo(model_dir: Path) -> list[str]:
    """Remote-code files of `model_dir` that differ from this repository's modeling_kptllm/ (worth a note)."""
    return [
        name for name in REMOTE_CODE_FILES
        if (model_dir / name).is_file() and (model_dir / name).read_bytes() != (REPO_CODE_DIR / name).read_bytes()
    ]


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _set_auto_map(path: Path, auto_map: dict[str, str]) -> None:
    data = json.loads(path.read_text())
    data["auto_map"] = {**data.get("auto_map", {}), **auto_map}
    _write_json(path, data)


def _set_custom_pipelines(path: Path) -> None:
    """config.json names the pipeline the export ships (a folder saved before the pipeline existed lacks it)."""
    data = json.loads(path.read_text())
    data["custom_pipelines"] = {**data.get("custom_pipelines", {}), **CUSTOM_PIPELINES}
    _write_json(path, data)


def list_folder(folder: Path) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file that an upload of `folder` sends, sorted."""
    return sorted(
        (p.relative_to(folder).as_posix(), p.stat().st_size)
        for p in folder.rglob("*")
        if p.is_file() and ".git" not in p.relative_to(folder).parts
    )


# -- validation -----------------------------------------------------------------------------

def _defined_classes(source: Path) -> set[str]:
    return {node.name for node in ast.walk(ast.parse(source.read_text())) if isinstance(node, ast.ClassDef)}


def _code_problems(folder: Path, name: str) -> list[str]:
    """Relative imports must resolve inside the folder; the repo's own packages must not be imported."""
    problems = []
    for node in ast.walk(ast.parse((folder / name).read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            module = (node.module or "").split(".")[0]
            if module and not (folder / f"{module}.py").is_file():
                problems.append(f"{name} imports .{module}, but {module}.py is not in the folder")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for module in modules:
                if module.split(".")[0] in ("modeling_kptllm", "processing", "hub"):
                    problems.append(f"{name} imports {module}, a package of this repository that the Hub does not have")
    return problems


def check_export_folder(folder: Path) -> list[str]:
    """Problems that would make `folder` a broken Hub repo (empty list: none)."""
    folder = Path(folder)
    names = {name for name, _ in list_folder(folder)}
    problems = [f"missing {name}" for name in REQUIRED_FILES if name not in names]
    if not names & set(TOKENIZER_FILES):
        problems.append(f"missing a tokenizer ({' or '.join(TOKENIZER_FILES)})")
    problems += [f"{name} is a pickle-based file (safetensors only)" for name in sorted(names) if is_pickle_file(Path(name))]

    weights = [name for name in names if name.endswith(".safetensors")]
    if "model.safetensors.index.json" in names:
        shards = set(json.loads((folder / "model.safetensors.index.json").read_text()).get("weight_map", {}).values())
        problems += [f"model.safetensors.index.json names {shard}, which is missing" for shard in sorted(shards - names)]
    elif "model.safetensors" not in names:
        problems.append("missing model.safetensors")
    for name in sorted(weights):
        try:
            with safe_open(folder / name, framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            problems.append(f"{name} is not a readable safetensors file ({error})")

    for config_name, required in (("config.json", MODEL_AUTO_MAP), ("processor_config.json", PROCESSOR_AUTO_MAP), ("tokenizer_config.json", {})):
        if config_name not in names:
            continue
        auto_map = json.loads((folder / config_name).read_text()).get("auto_map", {})
        problems += [f"{config_name}: auto_map lacks {key}" for key in required if key not in auto_map]
        for key, target in auto_map.items():
            for single in target if isinstance(target, list) else [target]:
                if single is None:
                    continue
                module, _, class_name = single.rpartition(".")
                module = module.split("--")[-1]  # "repo--module.Class" points at another repo's code
                if f"{module}.py" not in names:
                    problems.append(f"{config_name}: auto_map.{key} = {single!r}, but {module}.py is not in the folder")
                elif class_name not in _defined_classes(folder / f"{module}.py"):
                    problems.append(f"{config_name}: auto_map.{key} = {single!r}, but {module}.py defines no class {class_name}")
    if "config.json" in names and json.loads((folder / "config.json").read_text()).get("model_type") != KptLlmConfig.model_type:
        problems.append(f"config.json: model_type is not {KptLlmConfig.model_type!r}")
    if "config.json" in names:
        for task, info in json.loads((folder / "config.json").read_text()).get("custom_pipelines", {}).items():
            module, _, class_name = str(info.get("impl", "")).rpartition(".")
            if f"{module}.py" not in names:
                problems.append(f"config.json: custom_pipelines.{task} = {info.get('impl')!r}, but {module}.py is not in the folder")
            elif class_name not in _defined_classes(folder / f"{module}.py"):
                problems.append(f"config.json: custom_pipelines.{task} = {info.get('impl')!r}, but {module}.py defines no class {class_name}")
    for name in sorted(n for n in names if n.endswith(".py")):
        problems += _code_problems(folder, name)
    if CARD_FILE in names:
        try:
            library_name = ModelCard.load(folder / CARD_FILE).data.library_name
        except (ValueError, yaml.YAMLError) as error:  # malformed front matter
            problems.append(f"README.md: unreadable front matter ({error})")
        else:
            if library_name != "transformers":
                problems.append("README.md: front matter lacks library_name: transformers")
    return problems


# Runs in a fresh interpreter that cannot import this repository: only the folder's own code may load.
LOAD_CHECK_SCRIPT = textwrap.dedent(
    """
    import json, sys

    class BlockRepo:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling_kptllm", "processing", "hub", "tests"):
                raise ImportError(f"{name} belongs to the KptLLM repository, which a Hub user does not have")

    sys.meta_path.insert(0, BlockRepo())
    sys.path = [p for p in sys.path if p not in ("", ".")]

    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoModel, AutoProcessor

    folder = sys.argv[1]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    # a smoke forward: the processor's placeholders must match the model's features
    side = processor.image_size
    image = Image.linear_gradient("L").resize((side, side)).convert("RGB")
    inputs = processor(query=image, support=image, kpts=[[side / 2, side / 2]], task="visual")
    with torch.no_grad():
        logits = model(**inputs).logits
    print(json.dumps({
        "classes": [f"{type(obj).__module__}.{type(obj).__name__}" for obj in (config, model, processor)],
        "logits_shape": list(logits.shape),
        "logits_finite": bool(torch.isfinite(logits).all()),
    }))
    """
)


def check_loads_offline(folder: Path, timeout_s: int = 600) -> dict:
    """Loads `folder` with AutoConfig/AutoModel/AutoProcessor(trust_remote_code=True) offline, in a process
    that cannot import this repository, and runs one forward pass; returns what the process reported."""
    with tempfile.TemporaryDirectory(prefix="kptllm-load-check-") as scratch:
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        # a fresh modules cache: the remote code must come from the folder, not from an earlier load
        env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(Path(scratch) / "modules"))
        try:
            result = subprocess.run(
                [sys.executable, "-c", LOAD_CHECK_SCRIPT, str(Path(folder).resolve())],
                cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            raise ExportError(
                f"loading {folder} took over {timeout_s} s; for a model too large to load here pass --load_check false"
            ) from None
    if result.returncode != 0:
        raise ExportError(f"{folder} does not load with trust_remote_code offline:\n{result.stderr[-3000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    not_remote = [name for name in report["classes"] if not name.startswith("transformers_modules.")]
    if not_remote:
        raise ExportError(f"{folder}: {not_remote} did not load from the folder's remote code")
    if not report["logits_finite"]:
        raise ExportError(f"{folder}: the smoke forward pass gave non-finite logits")
    return report


# -- the export -----------------------------------------------------------------------------

@dataclass
class ExportResult:
    folder: Path
    status: str  # "written" | "replaced" | "unchanged"
    files: list[tuple[str, int]]
    left_out: list[str] = field(default_factory=list)
    load_check: dict | None = None


def _same_tree(a: Path, b: Path) -> list[str]:
    """Relative paths that differ between the two folders (empty: identical)."""
    files_a, files_b = {n for n, _ in list_folder(a)}, {n for n, _ in list_folder(b)}
    differ = sorted(files_a ^ files_b)
    differ += sorted(n for n in files_a & files_b if not filecmp.cmp(a / n, b / n, shallow=False))
    return differ


def _foreign_entries(folder: Path) -> list[str]:
    """Entries an export never writes (a .git clone, other files): --overwrite must not delete them."""
    ours = set(MODEL_FILES) | set(REMOTE_CODE_FILES) | {CARD_FILE}
    return sorted(
        p.name + ("/" if p.is_dir() else "")
        for p in folder.iterdir()
        if p.is_dir() or not (p.name in ours or fnmatch.fnmatch(p.name, SHARD_PATTERN))
    )


def export_folder(
    model_dir: str | Path,
    output_dir: str | Path,
    eval_json: str | Path,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    revision: str | None = None,
    datasets: list[str] | None = None,
    license: str = "apache-2.0",
    training_notes: str | None = None,
    code_from_repo: bool = False,
    overwrite: bool = False,
    load_check: bool = True,
) -> ExportResult:
    """Writes the Hub folder of `model_dir` to `output_dir` (see the module docstring)."""
    check_export_arguments(repo_id, base_model, datasets, revision, license)
    model_dir, output_dir = Path(model_dir).resolve(), Path(output_dir).resolve()
    if output_dir == model_dir or model_dir in output_dir.parents or output_dir in model_dir.parents:
        raise ExportError(f"--output_dir {output_dir} must lie outside the model folder {model_dir} and not contain it")
    if output_dir.exists() and not output_dir.is_dir():
        raise ExportError(f"--output_dir {output_dir} exists and is not a folder")
    report = load_eval_report(eval_json)  # fails early, before anything is written
    files, left_out = collect_model_files(model_dir, code_from_repo)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # staged beside the target so that the final rename is atomic and a failed export leaves nothing behind
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.staging-", dir=output_dir.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would make the published folder private to its owner
    try:
        for name, source in files.items():
            shutil.copyfile(source, staging / name)
        _set_auto_map(staging / "config.json", MODEL_AUTO_MAP)
        _set_custom_pipelines(staging / "config.json")
        _set_auto_map(staging / "processor_config.json", PROCESSOR_AUTO_MAP)
        # facts and training records come from the source folder (train.py writes its records beside it)
        card = build_model_card(
            report, model_dir, repo_id or f"your-username/{output_dir.name}", base_model=base_model,
            revision=revision, datasets=datasets, license=license, training_notes=training_notes,
        )
        card.save(staging / CARD_FILE)

        problems = check_export_folder(staging)
        if problems:
            raise ExportError("the export is not a valid Hub folder:\n  " + "\n  ".join(problems))
        load_report = check_loads_offline(staging) if load_check else None

        status = "written"
        if output_dir.is_dir() and any(output_dir.iterdir()):
            differ = _same_tree(staging, output_dir)
            if not differ:
                return ExportResult(output_dir, "unchanged", list_folder(output_dir), left_out, load_report)
            if not overwrite:
                raise ExportError(
                    f"{output_dir} is not empty and differs from this export ({len(differ)} files, e.g. "
                    f"{differ[:5]}); pass --overwrite to replace it, or choose another --output_dir (nothing was changed)"
                )
            foreign = _foreign_entries(output_dir)
            if foreign:
                raise ExportError(
                    f"{output_dir} holds {foreign}, which an export never writes; not replacing it even with "
                    "--overwrite (move them, or choose another --output_dir)"
                )
            shutil.rmtree(output_dir)
            status = "replaced"
        elif output_dir.is_dir():
            output_dir.rmdir()
        staging.rename(output_dir)
        return ExportResult(output_dir, status, list_folder(output_dir), left_out, load_report)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


# -- the push -------------------------------------------------------------------------------

@dataclass
class PushResult:
    repo_id: str
    dry_run: bool
    files: list[tuple[str, int]]
    commit: str | None = None  # the upload's commit: the revision the card pins
    commit_url: str | None = None
    card_commit: str | None = None


def format_listing(folder: Path, repo_id: str, files: list[tuple[str, int]], private: bool) -> str:
    width = max(len(f"{size:,}") for _, size in files)
    lines = [f"target: https://huggingface.co/{repo_id} (model repo, {'private' if private else 'public'}); from {folder}"]
    lines += [f"  {size:>{width},} B  {name}" for name, size in files]
    lines.append(f"  {sum(size for _, size in files):>{width},} B  total, {len(files)} files")
    return "\n".join(lines)


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    dry_run: bool = False,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload KptLLM (hub/export.py)",
    api_factory: Callable[..., HfApi] = HfApi,
    log: Callable[[str], None] = print,
) -> PushResult:
    """Uploads an exported folder to `repo_id` (or, with `dry_run`, lists what would upload, offline).

    A real push needs a token (`token`, HF_TOKEN or `hf auth login`) and network; without them it
    fails before any request. After `upload_folder`, README.md's usage snippet is pinned to the
    upload's commit and uploaded in a second commit (the first commit's files are otherwise identical).
    """
    folder = Path(folder)
    check_hub_id(repo_id, "--repo_id", PushError)
    problems = check_export_folder(folder)
    if problems:
        raise PushError(f"{folder} is not a valid export; run hub.export first:\n  " + "\n  ".join(problems))
    files = list_folder(folder)
    log(format_listing(folder, repo_id, files, private))
    if dry_run:
        log("dry run: nothing was uploaded (no network call was made)")
        return PushResult(repo_id, True, files)

    if is_offline_mode():
        raise PushError("HF_HUB_OFFLINE is set: pushing needs the network; unset it (nothing was uploaded)")
    token = token or get_token()
    if not token:
        raise PushError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access), "
            "or use --dry_run to list what would upload; nothing was uploaded"
        )
    api = api_factory(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    # delete_patterns="*": files of an earlier push that this export no longer has are removed, so the
    # repo mirrors the folder (huggingface_hub keeps .gitattributes and the files being uploaded)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=commit_message, delete_patterns="*"
    )
    log(f"uploaded: {commit.commit_url}")
    card_path = folder / CARD_FILE
    card_path.write_text(set_card_revision(card_path.read_text(), commit.oid))
    card_commit = api.upload_file(
        path_or_fileobj=str(card_path), path_in_repo=CARD_FILE, repo_id=repo_id, repo_type="model",
        commit_message=f"Pin the model card's usage snippet to revision {commit.oid}",
    )
    log(f"model card pinned to revision {commit.oid}: {card_commit.commit_url}")
    return PushResult(repo_id, False, files, commit.oid, commit.commit_url, card_commit.oid)


# -- command line ---------------------------------------------------------------------------

@dataclass
class ExportArguments:
    model: str = field(metadata={"help": "the trained KptLLM folder (train.py writes OUTPUT_DIR/model)"})
    eval_json: str = field(metadata={"help": "eval.py's evaluation JSON: the card's results"})
    output_dir: str = field(metadata={"help": "where the exact Hub folder is written"})
    repo_id: str | None = field(default=None, metadata={"help": "user-or-org/name on the Hub (needed by --push/--dry_run)"})
    base_model: str | None = field(default=None, metadata={"help": "Hub id of the model it was fine-tuned from (none: trained from scratch)"})
    datasets: str | None = field(default=None, metadata={"help": "comma-separated Hub dataset ids for the card (default: the evaluation's dataset types)"})
    license: str = field(default="apache-2.0", metadata={"help": "license of the weights (a LLaVA/Vicuna-based model inherits theirs)"})
    revision: str | None = field(default=None, metadata={"help": "commit the card's snippet pins (--push pins the upload's commit itself)"})
    training_notes: str | None = field(default=None, metadata={"help": "extra training details for the card"})
    code_from_repo: bool = field(default=False, metadata={"help": "ship this repository's modeling_kptllm/ instead of the folder's code"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty, different --output_dir"})
    load_check: bool = field(default=True, metadata={"help": "load the export offline in a fresh process (--load_check false for huge models)"})
    push: bool = field(default=False, metadata={"help": "upload to --repo_id (needs a token and network)"})
    dry_run: bool = field(default=False, metadata={"help": "list what would upload to --repo_id; no network call"})
    private: bool = field(default=False, metadata={"help": "create the repo private"})
    commit_message: str = field(default="Upload KptLLM (hub/export.py)", metadata={"help": "commit message of the upload"})


def main(argv: list[str] | None = None) -> tuple[ExportResult, PushResult | None]:
    (args,) = HfArgumentParser(ExportArguments).parse_args_into_dataclasses(args=argv)
    if (args.push or args.dry_run) and not args.repo_id:
        raise SystemExit("--push and --dry_run need --repo_id user-or-org/name")
    try:
        result = export_folder(
            args.model, args.output_dir, args.eval_json, repo_id=args.repo_id, base_model=args.base_model,
            revision=args.revision, datasets=args.datasets.split(",") if args.datasets else None, license=args.license,
            training_notes=args.training_notes, code_from_repo=args.code_from_repo, overwrite=args.overwrite,
            load_check=args.load_check,
        )
        print(f"export {result.status}: {result.folder} ({len(result.files)} files)")
        if result.left_out:
            print(f"left out of the export (not part of a model repo): {result.left_out}")
        if not args.code_from_repo and (differing := code_differing_from_repo(Path(args.model))):
            print(f"note: shipped the model folder's {differing} (the code its weights were saved with), which differ "
                  "from this repository's modeling_kptllm/; --code_from_repo ships the repository's instead")
        if result.load_check:
            print(f"loads offline with trust_remote_code: {result.load_check['classes']}")
        if not args.repo_id:
            print("no --repo_id: the card's usage snippet names a placeholder repo")
        pushed = None
        if args.push or args.dry_run:
            pushed = push_folder(
                result.folder, args.repo_id, dry_run=args.dry_run or not args.push, private=args.private,
                commit_message=args.commit_message,
            )
        else:
            print("to upload: add --repo_id user-or-org/name --push (or --dry_run to list the upload)")
        return result, pushed
    except (ExportError, EvalJsonError, PushError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
