"""``moeprep`` commands: fixture, convert, upload, lora split, verify, doctor, inspect.

Every ``MoeprepError`` becomes one line on stderr and exit code 2; any other error one line and exit code 1
(the traceback only with ``--debug`` or ``MOEPREP_DEBUG=1``)."""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table
from typer.core import TyperCommand

from moeprep.checkpoint.pipeline import use_huge_page_buffers
from moeprep.errors import MoeprepError

if TYPE_CHECKING:
    from moeprep.plan import Plan

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None)
DEBUG_ENV = "MOEPREP_DEBUG"
settings = SimpleNamespace(debug=False)
console = Console(stderr=True)
out = Console()


class Backend(str, Enum):
    auto = "auto"
    none = "none"
    triton = "triton"
    marlin = "marlin"
    flashinfer_trtllm = "flashinfer-trtllm"
    cpu = "cpu"
    dequant = "dequant"


class Arch(str, Enum):
    """CUDA architectures: of the layouts, and with ``--backend auto`` of the serving GPU."""

    any = "any"
    sm80 = "sm80"
    sm86 = "sm86"
    sm89 = "sm89"
    sm90 = "sm90"
    sm100 = "sm100"
    sm103 = "sm103"


FUSE_SHARED = "--fuse-shared-experts"
# The flag of each option of the Python API that library messages name (``errors.option``).
CLI_FLAGS = {
    "backend": "--backend",
    "arch": "--arch",
    "target_gpu": "--target-gpu",
    "device": "--device",
    "vllm_version": "--vllm-version",
    "revision": "--revision",
    "overwrite": "--overwrite",
    "loras": "--lora",
    "fuse_shared_replicas": FUSE_SHARED,
    "requantize_shared": "--requantize-shared-experts",
    "tp_size": "--tp",
    "ep_size": "--ep",
}
OPTION_REFERENCE = re.compile(r"`(\w+)(?:=([^`]*))?`")


def as_flags(text: str) -> str:
    """``text`` with the options it names as keyword arguments ("`tp_size=3`") written as flags (``--tp 3``)."""

    def flag(match: re.Match[str]) -> str:
        name, value = match.groups()
        if name not in CLI_FLAGS:
            return match.group(0)
        if value is None or value == "True":
            return CLI_FLAGS[name]
        value = value.strip("'\"")
        return f"{FUSE_SHARED}={value}" if name == "fuse_shared_replicas" else f"{CLI_FLAGS[name]} {value}"

    return OPTION_REFERENCE.sub(flag, text)


class OptionalReplicasCommand(TyperCommand):
    """``convert``: ``--fuse-shared-experts`` takes an optional value (``[=R]``; alone: one replica), which the
    click that typer vendors has no option type for. Its bare form is read as ``=1`` here, in the command's own
    argument parsing (click's ``Command.parse_args`` hook), so it holds wherever the command runs."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, bare_flag_as_one_replica(args))


def bare_flag_as_one_replica(args: list[str]) -> list[str]:
    """``args`` with a bare ``--fuse-shared-experts`` (not followed by a number) as ``--fuse-shared-experts=1``;
    nothing after ``--`` is touched."""
    end = args.index("--") if "--" in args else len(args)

    def bare(i: int) -> bool:
        return args[i] == FUSE_SHARED and i < end and not (i + 1 < end and args[i + 1].isdigit())

    return [f"{FUSE_SHARED}=1" if bare(i) else arg for i, arg in enumerate(args)]


def main() -> None:
    use_huge_page_buffers()
    app()


@app.callback()
def options(
    debug: Annotated[
        bool, typer.Option("--debug", envvar=DEBUG_ENV, help="show the traceback of an unexpected error")
    ] = False,
) -> None:
    """Prepare MoE checkpoints offline for vLLM."""
    settings.debug = debug


@contextmanager
def user_errors(action: str) -> Iterator[None]:
    """Turn MoeprepError into a one-line message and exit code 2, and any other error (a bug, or a failure
    moeprep did not foresee) into one line naming ``action`` and the file involved, exit code 1: no traceback
    unless ``--debug``. Usage errors pass through to click."""
    try:
        yield
    except MoeprepError as exc:
        sys.stderr.write(f"error: {as_flags(one_line(exc))}\n")
        raise typer.Exit(exc.exit_code) from None
    except (typer.Exit, typer.Abort, typer.BadParameter):  # exits and usage errors, which click reports
        raise
    except Exception as exc:
        if settings.debug:
            raise
        where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
        sys.stderr.write(
            f"error: unexpected {type(exc).__name__} while {action}{where}: {one_line(exc)} "
            f"(rerun with --debug or {DEBUG_ENV}=1 for the traceback, and please report it)\n"
        )
        raise typer.Exit(1) from None


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def parse_size(text: str) -> int:
    """A size as Hugging Face writes them: ``5GB`` is 5 * 10**9 bytes, ``5GiB`` 5 * 2**30."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(i?))?B?\s*", text, re.IGNORECASE)
    if not match:
        raise typer.BadParameter(f"{text!r} is not a size like 500MB, 5GB or 4GiB", param_hint="'--max-shard-size'")
    power = "_KMGT".index((match.group(2) or "_").upper())
    size = int(float(match.group(1)) * (1024 if match.group(3) else 1000) ** power)
    if size < 1:
        raise typer.BadParameter(
            f"{text!r} is no size for a shard; give one like 500MB or 5GB", param_hint="'--max-shard-size'"
        )
    return size


def say(*lines: str) -> None:
    """Lines on stdout exactly as given: never wrapped to the terminal's width nor read as markup, so a
    command printed on a line of its own can be copied and pasted."""
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    sys.stdout.flush()


@contextmanager
def byte_progress(total: int, label: str, disable: bool = False) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over ``total`` bytes on a terminal (none elsewhere, or when ``disable``); yields the
    callback that advances it."""
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=disable or not console.is_terminal,
    ) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


@app.command()
def fixture(
    family: Annotated[
        str, typer.Argument(help="gpt-oss, deepseek-v3, glm4-moe, qwen2-moe, qwen3-moe, llama4, mixtral")
    ],
    dest: Annotated[Path, typer.Argument(help="output folder")],
    preset: Annotated[
        str, typer.Option(help="tiny, or real expert dims (gpt-oss: 20b, 120b; deepseek-v3: v3; ...)")
    ] = "tiny",
    layers: Annotated[int | None, typer.Option(min=1, help="number of layers (default: the preset's)")] = None,
    seed: Annotated[int, typer.Option(help="random seed; same seed, same bytes")] = 0,
    quantization: Annotated[
        str, typer.Option(help="none (the family's own format) or fp8-block (DeepSeek-V3-style 128x128 fp8)")
    ] = "none",
    overwrite: bool = False,
) -> None:
    """Write a deterministic random checkpoint in a real model's exact on-disk format."""
    from moeprep.fixtures import build_fixture, fixture_bytes

    with user_errors(f"writing the {family} fixture to {dest}"):
        total = fixture_bytes(family, preset, layers, quantization)
        with byte_progress(total, f"fixture {family}") as advance:
            build_fixture(
                family, dest, preset, layers, seed, overwrite=overwrite, on_bytes=advance, quantization=quantization
            )
    say(f"wrote {family} ({preset}) fixture to {dest}")


@app.command(cls=OptionalReplicasCommand)
def convert(
    src: Annotated[str, typer.Argument(help="model folder or Hub repo id (org/name)")],
    dest: Annotated[Path, typer.Argument(help="output folder (written atomically)")],
    backend: Annotated[
        Backend, typer.Option(help="target layout (auto: the one vLLM selects on the serving GPU or CPU)")
    ] = Backend.auto,
    target_gpu: Annotated[
        str | None, typer.Option(help="with --backend auto: the GPU it will be served on (h100, h200, b200, a100, ...)")
    ] = None,
    arch: Annotated[
        Arch | None,
        typer.Option(
            help="GPU architecture of mxfp4 layouts (triton: sm90 or sm100; flashinfer-trtllm: sm100; marlin: any); "
            "with --backend auto, of the GPU it will be served on"
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="where layouts are computed: cpu or cuda")] = "cpu",
    vllm_version: Annotated[
        str | None,
        typer.Option(
            help="vLLM release to prepare mxfp4 layouts for (default: the installed vLLM where it runs the backend, "
            "else the newest supported)"
        ),
    ] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan, write nothing")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="print a JSON summary (with --dry-run: the plan, every tensor)")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print nothing but errors; no progress bar")] = False,
    max_shard_size: Annotated[
        str, typer.Option(help="cap per output shard, e.g. 5GB (5 * 10^9 bytes) or 4GiB")
    ] = "5GB",
    overwrite: bool = False,
    upload_repo: Annotated[
        str | None, typer.Option(help="after converting, upload DEST to this Hub repo (org/name)")
    ] = None,
    private: Annotated[bool, typer.Option(help="with --upload-repo: create the repo private")] = False,
    upload_revision: Annotated[str | None, typer.Option(help="with --upload-repo: branch to upload to")] = None,
    lora: Annotated[
        list[Path] | None, typer.Option(help="PEFT LoRA adapter to split for this base into DEST/lora/ (repeatable)")
    ] = None,
    fuse_shared_experts: Annotated[
        int,
        typer.Option(
            FUSE_SHARED,
            min=0,
            metavar="[R]",
            help="clone shared experts into R replicas of routed-expert slots (bare flag: R=1)",
        ),
    ] = 0,
    tp: Annotated[
        int,
        typer.Option(min=1, help="tensor-parallel size: write each rank's expert shards into its own files"),
    ] = 1,
    ep: Annotated[
        int,
        typer.Option(min=1, help="expert-parallel size (TP x DP ranks): write each rank's experts into its own files"),
    ] = 1,
    requantize_shared_experts: Annotated[
        bool,
        typer.Option(
            help="with --fuse-shared-experts: bring slots stored in another format than the routed experts to "
            "theirs (float <-> block fp8)"
        ),
    ] = False,
) -> None:
    """Prepare SRC for vLLM into DEST (and upload it with --upload-repo)."""
    from moeprep.convert import convert as run_convert
    from moeprep.convert import load_plan
    from moeprep.modelcard import serve_command
    from moeprep.plan import PASSTHROUGH, PlanOptions
    from moeprep.schema.serving import unserved_reason

    with user_errors(f"converting {src} to {dest}"):
        fused = fuse_shared_experts > 0
        check_convert_options(
            upload_repo, private, upload_revision, bool(lora), dry_run, fused, requantize_shared_experts
        )
        options = PlanOptions(
            arch.value if arch else None,
            device,
            fuse_shared_experts,
            requantize_shared_experts,
            tp,
            ep,
            vllm_version,
            target_gpu,
        )
        shard_bytes = parse_size(max_shard_size)  # before anything is downloaded
        source, plan = load_plan(src, backend.value, revision, options, headers_only=dry_run)
        if dry_run:
            if plan.chosen_because and not (as_json or quiet):
                say(f"backend {plan.target.backend}: {as_flags(plan.chosen_because)}")
            if not quiet:
                print_plan(plan, as_json)
            return
        with byte_progress(plan.total_bytes, "convert", disable=quiet or as_json) as advance:
            manifest = run_convert(source, plan, dest, overwrite, shard_bytes, advance, upload_repo, lora or [])
        unserved = unserved_reason(
            manifest.target, manifest.rank_tensors[0] if manifest.rank_tensors else (), on_cpu=False
        )
        report = {
            "dest": str(dest),
            "backend": manifest.target.backend,
            "chosen_because": as_flags(plan.chosen_because) if plan.chosen_because else None,
            "tensors": sum(1 for _ in manifest.all_tensor_records()),
            "files": len(manifest.files),
            "serve_command": None if unserved else serve_command(str(dest), plan.target, plan.summary()),
            "not_served_because": unserved,
            "nothing_transformed": all(job.recipe == PASSTHROUGH for job in plan.jobs) and not lora,
            "left_out_folders": source.left_out_folders,
        }
        if as_json:
            say(json.dumps(report, indent=2))
        elif not quiet:
            print_conversion(report, plan)
        if upload_repo:
            run_upload(dest, upload_repo, private, upload_revision)


def print_conversion(report: dict, plan: Plan) -> None:
    """What ``convert`` did, for people: the backend choice, then the serve command on a line of its own."""
    if report["chosen_because"]:
        say(f"backend {report['backend']}: {report['chosen_because']}")
    for folder in report["left_out_folders"]:
        say(f"left out {folder}/: it holds another copy of the weights")
    if report["nothing_transformed"]:
        say(nothing_transformed_hint(plan))
    wrote = f"wrote {report['tensors']} tensors in {report['files']} files to {report['dest']}"
    wrote += f" (backend {report['backend']})"
    if report["not_served_because"]:
        say(f"{wrote}; the moeprep plugin does not serve it yet: {report['not_served_because']}")
    else:
        say(f"{wrote}; serve with:", report["serve_command"])


def nothing_transformed_hint(plan: Plan) -> str:
    """What could help a folder in which every tensor is stored as in the source."""
    from moeprep.rank_shards import RANK_SPLIT_FORMATS

    helps = []
    if plan.moe.expert_format in RANK_SPLIT_FORMATS:
        helps.append("--tp N / --ep N (each rank reads only its own expert files)")
    if plan.family.shared_expert_module and plan.moe.shared_intermediate:
        helps.append("--fuse-shared-experts (one grouped MoE kernel runs the shared expert too)")
    helps.append("--lora ADAPTER (MoE LoRA split for vLLM)")
    return "nothing was re-laid out: vLLM loads these weights as stored; what can help: " + "; ".join(helps)


def check_convert_options(
    upload_repo: str | None,
    private: bool,
    upload_revision: str | None,
    lora: bool,
    dry_run: bool,
    fused: bool = False,
    requantize: bool = False,
) -> None:
    """Options of ``convert`` that need or exclude each other: a conflict is a usage error (exit code 2)."""
    conflicts = [
        (requantize and not fused, "--requantize-shared-experts", "applies to --fuse-shared-experts slots only"),
        (
            lora and fused,
            "--lora",
            "cannot be combined with --fuse-shared-experts yet: MoE LoRA does not cover shared-expert slots",
        ),
        (lora and dry_run, "--lora", "--dry-run writes nothing, so no adapter is split: drop --lora"),
        (upload_repo is None and private, "--private", "needs --upload-repo org/name"),
        (upload_repo is None and bool(upload_revision), "--upload-revision", "needs --upload-repo org/name"),
        (
            upload_repo is not None and dry_run,
            "--upload-repo",
            "--dry-run writes nothing, so there is nothing to upload: drop --upload-repo",
        ),
    ]
    for conflict, flag, message in conflicts:
        if conflict:
            raise typer.BadParameter(message, param_hint=f"'{flag}'")


def run_upload(
    folder: Path,
    repo_id: str,
    private: bool,
    revision: str | None,
    token: str | None = None,
    commit_message: str | None = None,
) -> None:
    from moeprep.hub import upload_prepared

    def stored(name: str) -> None:
        console.print(f"stored {name}")

    report = upload_prepared(folder, repo_id, private, revision, token, stored, commit_message)
    outcome = "in one new commit" if report.committed else "unchanged, no new commit"
    say(f"uploaded {folder} to {report.repo_id}@{report.revision}: {report.files} files, {outcome}")


@app.command()
def upload(
    repo_id: Annotated[str, typer.Argument(help="Hub repo id, org/name (created if missing)")],
    folder: Annotated[Path, typer.Argument(help="prepared folder (must pass moeprep verify)")] = Path("."),
    private: Annotated[bool, typer.Option(help="create the repo private")] = False,
    revision: Annotated[str | None, typer.Option(help="branch to upload to (created if missing)")] = None,
    token: Annotated[str | None, typer.Option(help="Hub token (default: HF_TOKEN or `hf auth login`'s)")] = None,
    commit_message: Annotated[
        str | None, typer.Option(help="what each commit says before the files it adds (default: moeprep: upload)")
    ] = None,
) -> None:
    """Verify FOLDER, then upload it to REPO_ID on the Hub (arguments in hf upload's order); run it again to resume
    an interrupted upload."""
    if Path(repo_id, "moeprep.json").is_file() and not Path(folder, "moeprep.json").is_file():
        swapped = f"moeprep upload {shlex.quote(str(folder))} {shlex.quote(repo_id)}"
        raise typer.BadParameter(f"the repo id comes first, as in hf upload: {swapped}", param_hint="REPO_ID FOLDER")
    with user_errors(f"uploading {folder} to {repo_id}"):
        run_upload(folder, repo_id, private, revision, token, commit_message)


def print_plan(plan: Plan, as_json: bool) -> None:
    if as_json:
        jobs = [
            {
                "tensor": j.entry.name,
                "dtype": j.entry.dtype,
                "shape": list(j.entry.shape),
                "recipe": j.recipe,
                "sources": list(j.sources),
            }
            for j in plan.jobs
        ]
        say(json.dumps({"summary": plan.summary(), "jobs": jobs}, indent=2))
        return
    groups: dict[str, list] = {}
    for job in plan.jobs:
        groups.setdefault(job.recipe, []).append(job)
    table = Table(
        "recipe", "tensors", "bytes", "e.g.", title=f"plan: {plan.family.name} -> backend {plan.target.backend}"
    )
    for recipe, jobs in sorted(groups.items()):
        table.add_row(recipe, str(len(jobs)), str(sum(j.entry.nbytes for j in jobs)), jobs[0].entry.name)
    out.print(table)
    say("(--json lists every tensor)", json.dumps(plan.summary(), indent=2))


lora_app = typer.Typer(no_args_is_help=True, help="MoE LoRA adapters for prepared bases.")
app.add_typer(lora_app, name="lora")


@lora_app.command("split")
def lora_split(
    adapter: Annotated[Path, typer.Argument(help="PEFT LoRA adapter folder")],
    base: Annotated[Path, typer.Option("--base", help="the prepared folder the adapter will be served with")],
    dest: Annotated[Path, typer.Option("--out", help="output adapter folder (written atomically)")],
    overwrite: bool = False,
) -> None:
    """Split fused / 3-D MoE LoRA into the per-expert adapter vLLM loads, padded like BASE."""
    from moeprep.lora import split_adapter

    with user_errors(f"splitting {adapter} for {base}"):
        report = split_adapter(adapter, base, dest, overwrite)
    command = [
        "vllm serve",
        shlex.quote(str(base)),
        f"--enable-lora --max-lora-rank {max(8, report.rank)}",
        *report.serve_flags,
        f"--lora-modules NAME={shlex.quote(str(dest))}",
    ]
    say(
        f"wrote {dest}: {report.expert_modules} expert modules, {report.passthrough_modules} other modules from "
        f"{report.input_tensors} input tensors (rank {report.rank}, scaling {report.scaling:g}); serve with:",
        " ".join(command),
    )
    if report.note:
        say(f"note: {report.note}")


@app.command()
def verify(
    folder: Annotated[Path, typer.Argument(help="prepared folder")],
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Re-hash every file and tensor of a prepared folder against moeprep.json."""
    from moeprep.verify import verify_folder

    with user_errors(f"verifying {folder}"):
        report = verify_folder(folder)
    if as_json:
        say(json.dumps({"ok": True, **asdict(report)}, indent=2))
    else:
        say(f"OK: {report.files} files, {report.tensors} tensors, {report.bytes} bytes match moeprep.json")


@app.command()
def doctor(
    folder: Annotated[Path | None, typer.Argument(help="prepared folder to prove against this vLLM")] = None,
) -> None:
    """Prove moeprep's layouts (FOLDER's, or each one this machine can check) against the installed vLLM."""
    from moeprep.doctor import doctor as run_doctor

    with user_errors(f"checking {folder or 'the layouts'} against this vLLM"):
        lines, failure = run_doctor(folder)
    say(*lines)
    if failure:
        sys.stderr.write(f"error: {failure}\n")
        raise typer.Exit(2)


@app.command()
def inspect(
    folder: Annotated[Path, typer.Argument(help="prepared folder")],
    as_json: Annotated[bool, typer.Option("--json", help="print the whole manifest as JSON")] = False,
) -> None:
    """Show what was done to a prepared folder."""
    from moeprep.schema.manifest import load_manifest
    from moeprep.schema.vllm_versions import served_vllm

    with user_errors(f"inspecting {folder}"):
        manifest = load_manifest(folder)
    if as_json:
        say(manifest.to_json().rstrip("\n"))
        return
    recipes: dict[str, int] = {}
    for _, record in manifest.all_tensor_records():
        recipes[record.recipe] = recipes.get(record.recipe, 0) + 1
    t = manifest.target
    say(f"model: {manifest.model_type} ({', '.join(manifest.architectures)})")
    say(
        f"source: {manifest.source.kind} {manifest.source.location}"
        + (f" @ {manifest.source.revision}" if manifest.source.revision else "")
    )
    say(
        f"target: backend {t.backend}, recipe {t.recipe} v{t.recipe_version}, vLLM {served_vllm(t)}, "
        f"TP {t.tp_size}, EP {t.ep_size}, padding {t.padding or '-'}, knobs {t.knobs or '-'}"
    )
    say(f"files: {len(manifest.files)}, {sum(f.size for f in manifest.files.values())} bytes")
    per_rank = f", of them {sum(map(len, manifest.rank_tensors))} in per-rank files" if manifest.rank_tensors else ""
    recipe_counts = ", ".join(f"{k}: {v}" for k, v in sorted(recipes.items()))
    say(f"tensors: {sum(recipes.values())} ({recipe_counts}{per_rank})")
    adapters = ", ".join(str(entry.get("path")) for entry in manifest.lora if isinstance(entry, dict)) or "none"
    fused = manifest.fused_shared
    fused_text = (
        f"{fused.slots} slot(s) x {fused.replicas} replica(s) after {fused.routed_experts} "
        f"routed experts, top-k {fused.top_k} -> {fused.fused_top_k}, slot weight {fused.slot_weight}"
        + (f", slots requantized {fused.slots_requantized}" if fused.slots_requantized else "")
        if fused
        else "no"
    )
    say(f"fused shared experts: {fused_text}; LoRA adapters: {adapters}")
