"""The ``m3sb`` command: parse, validate, call one function, print.

Heavy modules (torch, transformers) are imported inside the commands so that ``--help``
answers at once. Every error a user can cause is printed as one line on stderr with a
non-zero exit status; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer.exceptions import TyperException

if TYPE_CHECKING:
    from m3sb.config import ParetoConfig

app = typer.Typer(
    name="m3sb",
    help="Merge many fine-tuned models into one, and choose the trade-off between their tasks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)
T = TypeVar("T")
DEFAULT_MEMORY_CEILING = "1GB"  # m3sb merge's --memory

DebugOption = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
EvalDeviceOption = Annotated[
    str,
    typer.Option(
        "--device", help="Where evaluations run: auto (a GPU when there is one), cpu, cuda[:N], mps."
    ),
]
ExecutorOption = Annotated[
    str | None,
    typer.Option(
        "--executor",
        help="Where evaluations run: local (this process) or ray. \\[default: the config's, else local]",
    ),
]
RayAddressOption = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="Join this Ray cluster (HOST:PORT, ray://HOST:PORT, auto); else RAY_ADDRESS, else a local one.",
    ),
]
WorkersOption = Annotated[
    int | None,
    typer.Option(
        "--workers", min=1, help="At most this many Ray workers (default: one per GPU, else per CPU)."
    ),
]
AutocastOption = Annotated[
    str | None,
    typer.Option(
        "--autocast", help="Forward passes in none, float16 or bfloat16. \\[default: the config's, else none]"
    ),
]


def guarded(
    action: Callable[[], T], debug: bool, on_interrupt: str = "nothing was written at the output path"
) -> T:
    """Run ``action``; turn any failure into one line on stderr and exit status 1."""
    from m3sb.errors import M3SBError, first_line

    try:
        return action()
    except KeyboardInterrupt:
        if debug:
            raise
        errors.print(f"[red]interrupted[/red]; {escape(on_interrupt)}", highlight=False)
        raise typer.Exit(130) from None
    except M3SBError as error:
        if debug:
            raise
        errors.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except Exception as error:
        if debug:
            raise
        message = first_line(error)
        errors.print(
            f"[red]error:[/red] unexpected {type(error).__name__}: {escape(message)} "
            "(rerun with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="Merge recipe (mergekit's YAML schema).")],
    out_dir: Annotated[
        Path, typer.Argument(metavar="OUT_DIR", help="Folder to write the merged model into.")
    ],
    device: DeviceOption = "cpu",
    out_shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 5GB or 500MB.")] = "5GB",
    memory: Annotated[
        str | None,
        typer.Option(
            help="Resident memory the merge aims to stay within, e.g. 1GB. What the process "
            "already holds (Python and torch, about 0.6 GB) counts against it; the rest (at least "
            "64MB) bounds one tensor's merge, and larger tensors are merged in blocks of rows where "
            "the method allows it (linear, task_arithmetic, ties, dare_*, barycenter, karcher). "
            f"Default: {DEFAULT_MEMORY_CEILING}.",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT_DIR if it exists.")] = False,
    stages: Annotated[
        Path | None,
        typer.Option(
            "--stages",
            help="Multi-stage recipes: folder for the named stages (default OUT_DIR.stages); "
            "unchanged stages are reused.",
        ),
    ] = None,
    clean_stages: Annotated[
        bool, typer.Option("--clean-stages", help="Remove the stages folder once the final merge is done.")
    ] = False,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="Refuse keys and parameters that mergekit ignores (by default: ignored, with a note).",
        ),
    ] = False,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Merge the models that CONFIG names into OUT_DIR, one tensor at a time.

    CONFIG may hold several YAML documents (mergekit-multimerge's format): named stages,
    which later ones name as models, and a final merge written to OUT_DIR.
    """

    def run() -> None:
        import shutil

        from m3sb.checkpoints import check_output_folder
        from m3sb.config import MergeConfig, parse_size
        from m3sb.errors import ConfigError
        from m3sb.merge import MergePlan, check_recipe, merge_to_folder
        from m3sb.stages import STAGE_RECORD, Stage, load_documents, plan_stages, run_stages, stage_record

        recipes = load_documents(config, strict)
        shard_bytes = parse_size(out_shard_size)
        try:
            memory_bytes = parse_size(memory or DEFAULT_MEMORY_CEILING)
        except ConfigError as error:
            raise ConfigError(f"--memory: {error}") from None

        def show_notes(plan: MergePlan) -> None:
            for note in plan.notes:
                typer.echo(f"note: {note}", err=True)

        def merge_one(recipe: MergeConfig, destination: Path, replace: bool, extra: dict[str, str]) -> None:
            from m3sb.memory import MIN_TENSOR_BUDGET, resident_bytes, tensor_budget

            resident = resident_bytes()
            budget = tensor_budget(memory_bytes, resident)
            if memory is not None and resident is not None and memory_bytes - resident < MIN_TENSOR_BUDGET:
                typer.echo(
                    f"note: --memory {memory} is less than the {resident / 1e9:.2f} GB this process "
                    f"already holds plus {MIN_TENSOR_BUDGET >> 20} MiB; each tensor's merge is given "
                    f"{MIN_TENSOR_BUDGET >> 20} MiB",
                    err=True,
                )
            if quiet:
                merge_to_folder(
                    recipe,
                    destination,
                    device=device,
                    out_shard_size=shard_bytes,
                    force=replace,
                    memory=budget,
                    on_plan=show_notes,
                    extra_files=extra,
                    strict=strict,
                )
                return
            from m3sb.progress import merge_progress

            with merge_progress(console) as (on_plan, on_tensor):

                def planned(plan: MergePlan) -> None:
                    show_notes(plan)
                    on_plan(plan)

                result = merge_to_folder(
                    recipe,
                    destination,
                    device=device,
                    out_shard_size=shard_bytes,
                    force=replace,
                    memory=budget,
                    progress=on_tensor,
                    on_plan=planned,
                    extra_files=extra,
                    strict=strict,
                )
            from m3sb.memory import peak_resident_bytes

            peak = peak_resident_bytes()
            console.print(
                f"merged {result.tensors} tensors ({result.bytes_written / 1e9:.2f} GB) "
                f"with {recipe.merge_method} in {result.seconds:.1f} s"
                + (f", peak RSS {peak / 1e9:.2f} GB" if peak is not None else "")
                + f" -> {result.out_dir}",
                highlight=False,
            )

        if len(recipes) == 1:
            merge_one(recipes[0], out_dir, force, {})
            return
        for index, recipe in enumerate(recipes):
            try:
                check_recipe(recipe, strict)
            except ConfigError as error:
                raise ConfigError(f"{config} (document {index + 1}): {error}") from None
        check_output_folder(out_dir, force)  # before any stage runs
        folder = (stages or out_dir.with_name(out_dir.name + ".stages")).expanduser().resolve()
        planned = plan_stages(recipes, str(config), out_dir.expanduser().resolve(), folder)

        def merge_stage(stage: Stage, replace: bool) -> None:
            extra = {} if stage.final else {STAGE_RECORD: stage_record(stage)}
            merge_one(stage.config, stage.out_dir, replace or force, extra)

        say = (lambda _: None) if quiet else (lambda line: console.print(line, highlight=False, markup=False))
        run_stages(planned, merge_stage, say)
        if clean_stages and folder.is_dir():
            shutil.rmtree(folder)

    guarded(run, debug)


@app.command()
def methods(debug: DebugOption = False) -> None:
    """List the merge methods and their parameters."""

    def run() -> None:
        from m3sb.docs import methods_table

        console.print(methods_table())

    guarded(run, debug)


@app.command()
def experiment(
    config: Annotated[
        Path, typer.Argument(metavar="CONFIG", help="Experiment YAML (models, datasets, merges).")
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for results.csv, the plots and report.html.")
    ] = Path("m3sb-experiment"),
    device: EvalDeviceOption = "auto",
    executor: ExecutorOption = None,
    ray_address: RayAddressOption = None,
    workers: WorkersOption = None,
    autocast: AutocastOption = None,
    debug: DebugOption = False,
) -> None:
    """Merge the task models every configured way, rebuild each task's classifier, score them.

    Resumable: each merge's scores are kept in OUT/scores.jsonl as they finish; rerunning
    with the same --out scores only what is missing.
    """

    def run() -> None:
        import yaml

        from m3sb.config import load_experiment_config
        from m3sb.experiment import SCORES, Experiment, TaskVectorExperiment
        from m3sb.report import print_results, write_figures, write_report, write_results

        spec = load_experiment_config(config)
        kind = TaskVectorExperiment if spec.task_vectors else Experiment
        runner = kind(
            spec.name,
            spec.model_checkpoints,
            spec.datasets_config,
            spec.merge_configs,
            spec.base_model_checkpoint,
            device=device,
            batch_size=spec.batch_size,
            trust_remote_code=spec.trust_remote_code,
            log=lambda line: console.print(line, highlight=False),
            autocast=autocast or spec.autocast,
            processor_checkpoint=spec.processor_checkpoint,
            cache_dir=spec.cache_dir,
            statistics=spec.statistics,
        )
        results = runner.run(
            executor or spec.executor, ray_address or spec.ray_address, workers, record=out / SCORES
        )
        written = write_results(results, out)
        figures = write_figures(results, runner.points, runner.point_kinds, out)
        configuration = yaml.safe_dump(spec.model_dump(), sort_keys=False)
        report = write_report(
            results, figures, configuration, out, points=runner.points, kinds=runner.point_kinds
        )
        print_results(results, console)
        console.print(f"results: {written}\nreport: {report}", highlight=False)

    guarded(run, debug, f"finished scores are kept in {out}/scores.jsonl; rerun to resume")


@app.command()
def pareto(
    config: Annotated[
        Path,
        typer.Argument(metavar="CONFIG", help="Pareto YAML (base model, tasks, method, metric, budget)."),
    ],
    results_path: Annotated[
        Path,
        typer.Option(
            "--results-path", help="Folder for evaluations.csv, front.csv, selected.json, plots (resumable)."
        ),
    ],
    mode: Annotated[str, typer.Option("--mode", help="map, bayesian or nested.")] = "map",
    preference: Annotated[
        Path | None, typer.Option("--preference", help="YAML mapping task name to weight; picks a point.")
    ] = None,
    rule: Annotated[
        str, typer.Option("--rule", help="How a preference picks: weighted_sum (the seed's) or chebyshev.")
    ] = "weighted_sum",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the design and the search.")] = 0,
    pairing: Annotated[
        str,
        typer.Option(
            "--pairing",
            help="nested mode: similarity (most alike task vectors pair) or accuracy (MAP's procedure: "
            "closest fine-tuned accuracies pair, one surrogate per side on its weighted metric).",
        ),
    ] = "similarity",
    grid: Annotated[
        int | None, typer.Option("--grid", help="Also evaluate an N-per-axis grid (ground truth).")
    ] = None,
    save_model: Annotated[
        bool,
        typer.Option("--save-model", help="Save the selected merge (one classifier per task) in DIR/model."),
    ] = False,
    baselines: Annotated[
        bool,
        typer.Option(
            "--baselines/--no-baselines", help="Also score task arithmetic, TIES and the barycenter."
        ),
    ] = True,
    device: EvalDeviceOption = "auto",
    executor: ExecutorOption = None,
    ray_address: RayAddressOption = None,
    workers: WorkersOption = None,
    autocast: AutocastOption = None,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Search the trade-off between tasks (MAP): an amortized Pareto front over task-vector coefficients."""

    def run() -> None:
        from m3sb.errors import ConfigError
        from m3sb.pareto.front import MODES
        from m3sb.pareto.run import run_pareto

        if mode not in MODES:
            raise ConfigError(f"--mode {mode}: choose one of {', '.join(MODES)}")
        if rule not in ("weighted_sum", "chebyshev"):
            raise ConfigError(f"--rule {rule}: choose weighted_sum or chebyshev")
        from m3sb.pareto.search import PAIRINGS, SearchSettings

        if pairing not in PAIRINGS:
            raise ConfigError(f"--pairing {pairing}: choose one of {', '.join(PAIRINGS)}")
        if pairing != "similarity" and mode != "nested":
            raise ConfigError(f"--pairing {pairing}: pairs tasks in nested mode only, not --mode {mode}")
        spec, weights = _search_spec(config, autocast, preference)
        outcome = run_pareto(
            spec,
            results_path,
            mode=mode,
            preference=weights,
            seed=seed,
            grid_points=grid,
            save_model=save_model,
            device=device,
            rule=rule,  # type: ignore[arg-type]
            baselines=baselines,
            search=SearchSettings(pairing=pairing),  # type: ignore[arg-type]
            executor=executor,
            ray_address=ray_address,
            workers=workers,
            log=None if quiet else (lambda line: console.print(line, highlight=False, markup=False)),
        )
        if not quiet:
            from m3sb.pareto.report import print_outcome

            print_outcome(outcome, console)

    guarded(run, debug, f"finished evaluations are kept in {results_path}/evaluations.csv; rerun to resume")


@app.command()
def evolve(
    config: Annotated[
        Path,
        typer.Argument(
            metavar="CONFIG", help="Pareto YAML (base model, tasks, method, metric; an evolve: section)."
        ),
    ],
    results_path: Annotated[
        Path,
        typer.Option("--results-path", help="Folder for evaluations.csv and best.json (resumable)."),
    ],
    preference: Annotated[
        Path | None,
        typer.Option("--preference", help="YAML mapping task name to weight (the objective's weights)."),
    ] = None,
    generations: Annotated[
        int | None,
        typer.Option("--generations", help="CMA-ES generations. \\[default: the config's, else 10]"),
    ] = None,
    population: Annotated[
        int | None,
        typer.Option("--population", help="Genomes per generation. \\[default: the config's, else CMA-ES's]"),
    ] = None,
    layer_groups: Annotated[
        int | None,
        typer.Option(
            "--layer-groups",
            help="Weights per model, read as a gradient over the layers. \\[default: the config's, else 1]",
        ),
    ] = None,
    density: Annotated[
        str | None,
        typer.Option(
            "--density",
            help="Evolve the method's density: auto, per_model, global or fixed. "
            "\\[default: the config's, else auto]",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of CMA-ES's samples.")] = 0,
    save_model: Annotated[
        bool,
        typer.Option("--save-model", help="Save the best merge (one model per task) in DIR/model."),
    ] = False,
    device: EvalDeviceOption = "auto",
    executor: ExecutorOption = None,
    ray_address: RayAddressOption = None,
    workers: WorkersOption = None,
    autocast: AutocastOption = None,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Evolve a merge's weights (and density) with CMA-ES for one preference-weighted objective."""

    def run() -> None:
        from m3sb.pareto.evolve_run import run_evolve

        spec, weights = _search_spec(config, autocast, preference)
        outcome = run_evolve(
            spec,
            results_path,
            preference=weights,
            seed=seed,
            generations=generations,
            population=population,
            layer_groups=layer_groups,
            density=density,
            save_model=save_model,
            device=device,
            executor=executor,
            ray_address=ray_address,
            workers=workers,
            log=None if quiet else (lambda line: console.print(line, highlight=False, markup=False)),
        )
        if not quiet:
            evolution = outcome.evolution
            console.print(
                f"{outcome.metric} objective: start {evolution.start_objective:.4f} -> best "
                f"{evolution.best_objective:.4f} ({outcome.best['phase']}); {outcome.new_evaluations} new "
                f"evaluations, {outcome.reused_evaluations} reused"
                + (f"; CMA-ES stopped early ({evolution.stopped})" if evolution.stopped else ""),
                highlight=False,
                markup=False,
            )
            for label, path in outcome.files.items():
                console.print(f"{label}: {path}", highlight=False, markup=False)

    guarded(run, debug, f"finished evaluations are kept in {results_path}/evaluations.csv; rerun to resume")


@app.command()
def compare(
    folders: Annotated[
        list[Path] | None,
        typer.Argument(metavar="RESULTS_DIR", help="Folders that m3sb experiment wrote (results.csv)."),
    ] = None,
    out: Annotated[
        Path,
        typer.Option("--out", help="Folder for comparison.csv, comparison.png and comparison.html."),
    ] = Path("m3sb-comparison"),
    metric: Annotated[
        list[str] | None,
        typer.Option(
            "--metric",
            help="accuracy, precision, recall, f1_score or normalized_accuracy; repeat for one PNG "
            "per metric (the first is comparison.png and the printed table). \\[default: accuracy]",
        ),
    ] = None,
    debug: DebugOption = False,
) -> None:
    """Compare experiments: every row of each RESULTS_DIR/results.csv, side by side, per task."""

    def run() -> None:
        from m3sb.compare import load_results, print_summary, summary_table, write_comparison

        metrics = metric or ["accuracy"]
        frame = load_results(folders or [])
        paths = write_comparison(frame, out, metrics)
        print_summary(summary_table(frame, metrics[0]), metrics[0], console)
        console.print(
            "\n".join(f"{name}: {path}" for name, path in paths.items()), highlight=False, markup=False
        )

    guarded(run, debug)


@app.command()
def convert(
    source: Annotated[
        Path,
        typer.Argument(
            metavar="FILE",
            help="An open_clip checkpoint: a state dict (.pt, .bin, .safetensors) or a whole pickled "
            "module as the task_vectors project saved its fine-tunes. No code in it is run.",
        ),
    ],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Folder for the Hugging Face checkpoint.")],
    heads: Annotated[
        int | None,
        typer.Option(help="Attention heads, where a state dict cannot say. \\[default: width / 64]"),
    ] = None,
    activation: Annotated[
        str | None,
        typer.Option(
            help="quick_gelu (OpenAI's CLIPs) or gelu, where a state dict cannot say. \\[default: quick_gelu]"
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    debug: DebugOption = False,
) -> None:
    """Convert an open_clip vision tower to a Hugging Face CLIPVisionModelWithProjection folder."""

    def run() -> None:
        from m3sb.convert import convert_open_clip

        tower = convert_open_clip(source, out, heads=heads, activation=activation, force=force)
        console.print(
            f"{out}: CLIP vision tower, {tower.layers} layers x {tower.hidden_size} wide, "
            f"{tower.heads} heads, {tower.image_size}px in {tower.patch_size}px patches, "
            f"projection {tower.projection_dim}, {tower.activation}",
            highlight=False,
            markup=False,
        )

    guarded(run, debug)


@app.command()
def statistics(
    models: Annotated[
        list[str], typer.Argument(metavar="MODEL...", help="The fine-tuned model(s) (folders or hub ids).")
    ],
    out: Annotated[
        Path,
        typer.Argument(
            metavar="OUT",
            help="The statistics file to write (.safetensors); with several models, a folder "
            "that receives one file per model.",
        ),
    ],
    task: Annotated[
        list[str],
        typer.Option(
            "--task",
            help="A model's training data: a dataset entry as experiments write it (a YAML file, "
            "or inline: '{dataset_name: ./data, split: train, kind: clip_zero_shot}'); once per "
            "model, in order, or once for all.",
        ),
    ],
    kind: Annotated[
        str,
        typer.Option(
            help="gram (input Gram matrices, for regmean), fisher (diagonal Fisher) or gram_plusplus "
            "(Gram matrices through the merged earlier layers, for regmean_plusplus: all models at once)."
        ),
    ] = "gram",
    samples: Annotated[int, typer.Option(min=1, help="Examples to use (the split's first).")] = 256,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per forward pass (gram).")] = 32,
    base: Annotated[
        str | None, typer.Option(help="Base model (clip_zero_shot: where the text tower comes from).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the labels drawn for the Fisher.")] = 0,
    weights: Annotated[
        str | None,
        typer.Option(help="gram_plusplus: the models' merge weights, comma-separated (default: equal)."),
    ] = None,
    reduce_non_diagonal_ratio: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="gram_plusplus: the merge's off-diagonal scale.")
    ] = 0.95,
    device: EvalDeviceOption = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    debug: DebugOption = False,
) -> None:
    """Compute models' statistics for regmean (--kind gram), fisher (--kind fisher) or
    regmean_plusplus (--kind gram_plusplus)."""

    def run() -> None:
        from m3sb.devices import resolve_device
        from m3sb.errors import ConfigError
        from m3sb.statistics import check_kind, compute_statistics, parse_task
        from m3sb.statistics_files import statistics_destinations, write_statistics

        check_kind(kind)
        destinations = statistics_destinations(models, out, force)
        if len(task) not in (1, len(models)):
            raise ConfigError(
                f"--task: given {len(task)} times for {len(models)} models; give it once, or once per model"
            )
        entries = task * len(models) if len(task) == 1 else task
        specs = [parse_task(entry, model) for model, entry in zip(models, entries, strict=True)]
        chosen = resolve_device(device)
        if kind == "gram_plusplus":
            from m3sb.layerwise_statistics import compute_plusplus_statistics

            weight_list = None if weights is None else _numbers(weights, "--weights")
            results = compute_plusplus_statistics(
                specs, weight_list, reduce_non_diagonal_ratio, samples, batch_size, chosen, base
            )
        elif weights is not None:
            raise ConfigError("--weights: only gram_plusplus statistics depend on the merge's weights")
        else:
            results = [
                compute_statistics(spec, kind, samples, batch_size, seed, chosen, base) for spec in specs
            ]
        for destination, model, (tensors, metadata) in zip(destinations, models, results, strict=True):
            write_statistics(tensors, metadata, destination)
            console.print(
                f"{destination}: {kind} statistics of {len(tensors)} tensors of {model} "
                f"from {metadata['examples']} examples",
                highlight=False,
                markup=False,
            )

    guarded(run, debug)


def _search_spec(
    config: Path, autocast: str | None, preference: Path | None
) -> tuple[ParetoConfig, list[float] | None]:
    """A Pareto config (``pareto`` and ``evolve``) with ``--autocast`` applied, and the
    ``--preference`` file's weights over its merged tasks (None without one)."""
    from m3sb.config import load_pareto_config, load_preference

    spec = load_pareto_config(config)
    if autocast is not None:
        from m3sb.tasks.metrics import check_autocast

        spec = spec.model_copy(update={"autocast": check_autocast(autocast)})
    weights = load_preference(preference, [t.name for t in spec.merged_tasks]) if preference else None
    return spec, weights


def _numbers(text: str, option: str) -> list[float]:
    """Comma-separated numbers; a one-line error naming ``option`` otherwise."""
    from m3sb.errors import ConfigError

    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"{option}: expected comma-separated numbers, got {text!r}") from None


@app.command()
def zoo(
    folder: Annotated[
        Path, typer.Argument(metavar="DIR", help="Folder for the zoo (reused when already built).")
    ],
    seed: Annotated[int, typer.Option(help="Seed of the data splits and training.")] = 0,
    kind: Annotated[
        str,
        typer.Option(
            help="digits (a ViT with its own heads), clip (a CLIP and vision-only fine-tunes "
            "scored zero-shot) or text (a tiny Llama fine-tuned on four exact-answer skills)."
        ),
    ] = "digits",
    debug: DebugOption = False,
) -> None:
    """Build a zoo offline: a tiny base, its fine-tunes, and their datasets."""

    def run() -> None:
        from m3sb.errors import ConfigError

        def log(line: str) -> None:
            console.print(line, highlight=False, markup=False)

        if kind == "digits":
            from m3sb.zoo import ZooRecipe, build_zoo

            manifest = build_zoo(folder, ZooRecipe(seed=seed), log=log)
        elif kind == "clip":
            from m3sb.clip_zoo import ClipZooRecipe, build_clip_zoo

            manifest = build_clip_zoo(folder, ClipZooRecipe(seed=seed), log=log)
        elif kind == "text":
            from m3sb.text_zoo import TextZooRecipe, build_text_zoo

            manifest = build_text_zoo(folder, TextZooRecipe(seed=seed), log=log)
        else:
            raise ConfigError(f"--kind {kind}: expected digits, clip or text")
        console.print(f"zoo ready: {manifest}", highlight=False)

    guarded(run, debug)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's models and results.")] = Path(
        "m3sb-demo"
    ),
    device: EvalDeviceOption = "auto",
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Offline tour: merge toy models every way, then run M3SB experiments on the digits zoo."""

    def run() -> None:
        from m3sb.demo import run_demo

        run_demo(out, console=None if quiet else console, device=device)

    guarded(run, debug)


def main() -> None:
    """Entry point of the ``m3sb`` console script."""
    # Idle OpenMP threads spin before they sleep. Sleeping at once (OMP_WAIT_POLICY=PASSIVE)
    # costs a wake-up per parallel op: TIES, thousands of small ops per tensor, took 48 s
    # on the 1.1B case of benchmarks/bench_merge.py (2 cores); spinning without end
    # (ACTIVE) starves the writer thread; a short spin gave linear 6.6 s, TIES 18 s.
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    code: int | str | None = 0
    try:
        result = app(standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except typer.Abort:
        code = 130
    except TyperException as error:  # usage errors: unknown option, missing argument, ...
        context = getattr(error, "ctx", None)
        command = f"m3sb {context.info_name} --help" if context and context.parent else "m3sb --help"
        message = error.format_message() if hasattr(error, "format_message") else str(error)
        errors.print(f"[red]error:[/red] {escape(message)} (see {command})", highlight=False, soft_wrap=True)
        code = getattr(error, "exit_code", 2)
    except SystemExit as exit_:
        code = exit_.code
    # Every command has finished its work and closed its files. Tearing down the
    # interpreter after importing torch takes about half a second; skip it.
    sys.stdout.flush()
    sys.stderr.flush()
    if isinstance(code, str):
        print(code, file=sys.stderr, flush=True)
        code = 1
    os._exit(code or 0)


if __name__ == "__main__":
    main()
