"""The `vidpipe` command line: each command parses options and calls one library function.

User mistakes raise `VidpipeError`; `main` prints them as one line and exits with code 2.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import click

from vidpipe.core.atomic import disk_full
from vidpipe.core.errors import BatchIncomplete, DiskFull, VidpipeError
from vidpipe.core.log import HEARTBEAT_S, configure_cli_logging, remove_cli_logging
from vidpipe.core.memory import limit_malloc_arenas
from vidpipe.core.stop import (Interrupted, blocked_threads, handle_stop_signals,
                               restore_signals, stop_signal, stopped_by, what_was_kept)
from vidpipe.extractors.flow_methods import FLOW_METHODS, flow_help
from vidpipe.core.paths import require_checkpoint_file, require_input, require_sources

# `vidpipe --help` lists the commands in the order a user runs them (any command not named
# here follows, in the order it is defined).
PIPELINE_ORDER = ["extract", "labels", "import-features", "export-features", "train", "eval",
                  "calibrate", "detect", "demo", "model-info", "cache"]


class PipelineGroup(click.Group):
    """A group whose help lists its commands in pipeline order, each with its whole first
    paragraph (click's default sorts them and cuts the text at 45 characters)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        rank = {name: i for i, name in enumerate(PIPELINE_ORDER)}
        return sorted(self.commands, key=lambda name: rank.get(name, len(rank)))

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, command.get_short_help_str(limit=sys.maxsize))
                for name in self.list_commands(ctx)
                if not (command := self.commands[name]).hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


PATH = click.Path(path_type=str)
OUT_FILE = click.Path(dir_okay=False, path_type=str)     # an existing folder there is refused
OUT_FOLDER = click.Path(file_okay=False, path_type=str)  # an existing file there is refused


def path_option(*names: str, **options):
    """An option naming a file or folder (None when not given); type=OUT_FILE / OUT_FOLDER
    for an output, so that a folder where a file goes (or the reverse) is a one-line error."""
    return click.option(*names, type=options.pop("type", PATH), **options)


def device_option(default: str | None = None):
    """The `--device` option every command running a model shares."""
    return click.option("--device", default=default, show_default=default is not None,
                        help="cpu, cuda, cuda:1 (default: cuda when available).")


def labelled_cache_options(command):
    """`--cache` and `--labels`: the labelled features that train and eval read."""
    labels = path_option("--labels", help="labels.h5 or an annotation file (default: CACHE/labels.h5).")
    command = labels(command)
    return path_option("--cache", required=True, help="Feature cache folder.")(command)


def set_option(example: str):
    """The repeatable `--set KEY=VALUE` override of a config value; `example` shows one."""
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                        help=f"Override a config value, e.g. --set {example} (repeatable).")


def event_rule_options(command):
    """`--threshold`, `--class-threshold`, `--min-duration`, `--merge-gap`, handed to the
    command as one `settings` (TimelineSettings; None when none is given)."""
    @functools.wraps(command)
    def with_settings(*args, threshold, class_threshold, min_duration, merge_gap, **kwargs):
        from vidpipe.pipeline.calibrate import command_line_rules
        settings = command_line_rules(threshold, class_threshold, min_duration, merge_gap)
        return command(*args, settings=settings, **kwargs)
    options = [  # in the order --help shows them
        click.option("--threshold", default=None, type=float,
                     help="Probability at which a class starts (default 0.5). Any of --threshold, "
                          "--class-threshold, --min-duration, --merge-gap replaces the checkpoint's "
                          "calibrated rules (`vidpipe calibrate`) by these options and the defaults."),
        click.option("--class-threshold", multiple=True, metavar="NAME=VALUE",
                     help="Threshold for one class (repeatable)."),
        click.option("--min-duration", default=None, type=float,
                     help="Drop segments shorter than this (seconds; default 0.5)."),
        click.option("--merge-gap", default=None, type=float,
                     help="Merge same-class segments separated by at most this (seconds; default 0.5).")]
    for option in reversed(options):
        with_settings = option(with_settings)
    return with_settings


def feature_weights_options(command):
    """`--rgb-weights`, `--flow-weights`, `--raft-weights`: the local weights files a
    checkpoint's features were made with, handed to the command as one `weights` dict."""
    @functools.wraps(command)
    def with_weights(*args, rgb_weights, flow_weights, raft_weights, **kwargs):
        given = (("rgb", rgb_weights), ("flow", flow_weights), ("raft", raft_weights))
        return command(*args, weights={kind: path for kind, path in given if path}, **kwargs)
    for kind, help in reversed([("rgb", "Weights file the RGB features were made with."),
                                ("flow", "Weights file the flow features were made with."),
                                ("raft", "RAFT weights file the flow was made with.")]):
        with_weights = path_option(f"--{kind}-weights", help=help)(with_weights)
    return with_weights


@click.group(cls=PipelineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vidpipe")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors (no progress, no info).")
@click.option("-v", "--verbose", is_flag=True, help="Also debug messages.")
def cli(quiet: bool, verbose: bool) -> None:
    """vidpipe: raw video -> two-stream features -> MALT -> online action timeline."""
    if quiet and verbose:
        raise click.UsageError("--quiet and --verbose exclude each other")
    configure_cli_logging(-1 if quiet else 1 if verbose else 0)
    limit_malloc_arenas()   # before any worker thread starts (core.memory says why)


# Commands are added below, one section per stage; imports of the libraries stay inside each
# command, after the checks of the paths it was given (vidpipe.core.paths), so that
# `vidpipe --help` and a mistyped file name are answered at once, not after torch's import
# (seconds). Library functions log what they do (vidpipe.core.log); a command prints only
# its result.

# --- extract ------------------------------------------------------------------------------

@cli.command()
@click.argument("videos_dir", type=PATH)
@path_option("--out", type=OUT_FOLDER, required=True,
             help="Feature cache folder (created; rerun to resume or update it).")
@path_option("--config", help="Feature settings YAML (default: built-in defaults = configs/extract.yaml).")
@device_option()
@click.option("--flow", "flow_method", type=click.Choice(list(FLOW_METHODS)), default=None,
              help=flow_help())
@click.option("--recipe", type=click.Choice(["tsn-kinetics", "tsn-kinetics-r50"]), default=None,
              help="Reproduce the public TSN Kinetics features (docs/extract.md): RGB and flow weights "
                   "files from mmaction2 / TSN via --rgb-weights and --flow-weights.")
@click.option("--rgb-backbone", default=None, help="timm model for the RGB stream (default resnet50).")
@click.option("--flow-backbone", default=None, help="timm model for the flow stream (default resnet50).")
@path_option("--rgb-weights", help="Local weights file for the RGB backbone instead of the hub's.")
@path_option("--flow-weights", help="Local weights file for the flow backbone (RGB ImageNet weights "
                                    "are adapted to the flow channels; a flow network's own weights "
                                    "load as they are).")
@click.option("--random-init", is_flag=True, default=None,
              help="Seeded random weights instead of pretrained ones (tests, demos, offline); "
                   "the seed is --set seed=N (default 0).")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0),
              help="Threads decoding videos ahead of the model.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16", "auto"]), default=None,
              help="The CNNs' products (default fp32): bf16 (CPU or GPU), fp16 (GPU), auto (bf16 where the "
                   "hardware has it). Recorded in the cache: a bf16 cache is another cache.")
@set_option("dis_preset=fast --set batch_size=32")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def extract(videos_dir: str, out: str, config: str | None, device: str | None,
            flow_method: str | None, recipe: str | None, rgb_backbone: str | None, flow_backbone: str | None,
            rgb_weights: str | None, flow_weights: str | None, random_init: bool | None,
            workers: int, precision: str | None, overrides: tuple[str, ...], no_progress: bool) -> None:
    """Extract two-stream features of every video under VIDEOS_DIR into the cache --out.

    Videos (mp4, mkv, webm, avi, mov, ...) are resampled to 24 fps; each chunk of 6 frames
    gives one RGB and one flow vector (TSN convention). Videos already cached unchanged are
    skipped; bad files are reported at the end (exit code 1 if any failed). Under torchrun
    (e.g. `torchrun --nproc-per-node 4 --no-python vidpipe extract ...`) each rank takes
    its share of the videos.
    """
    require_input(videos_dir)
    from vidpipe.pipeline.extract import extract_folder, load_settings

    settings = load_settings(config, overrides, flow_method=flow_method, recipe=recipe, rgb_backbone=rgb_backbone,
                             flow_backbone=flow_backbone, rgb_weights=rgb_weights,
                             flow_weights=flow_weights, random_init=random_init, precision=precision)
    summary = extract_folder(videos_dir, out, settings, device=device, workers=workers,
                             progress=not no_progress)
    if summary.rank == 0 or not summary.all_ranks:
        click.echo(summary.report())
    if not summary.ok:
        sys.exit(1)


# --- labels / import ----------------------------------------------------------------------

@cli.command()
@click.argument("annotations", nargs=-1, required=True, type=PATH)
@path_option("--cache", required=True, help="Feature cache whose step timestamps the labels are built on.")
@click.option("--classes", default=None,
              help="Class order: comma-separated names, or a text file with one per line "
                   "(default: the file's own list, else its labels sorted).")
@path_option("--out", type=OUT_FILE, help="Output labels file (default: CACHE/labels.h5).")
@click.option("--skip-missing", is_flag=True,
              help="Skip annotated videos that are not in the cache instead of failing.")
def labels(annotations: tuple[str, ...], cache: str, classes: str | None, out: str | None,
           skip_missing: bool) -> None:
    """Turn ANNOTATIONS into per-step targets on a cache's steps.

    Each of ANNOTATIONS is a CSV file (video,label,start_s,end_s[,split]), a JSON file (ours or
    ActivityNet-style), or a THUMOS'14 folder of <Class>_val.txt / <Class>_test.txt files;
    several are read as one (e.g. THUMOS'14's validation and test annotation folders).

    The rule is the field's: each step takes the classes of the segments containing its
    centre, i.e. the chunk's centre frame (1/k on each of k overlapping classes, background if
    none); Ambiguous segments mark steps to ignore. See docs/detect.md.
    """
    from vidpipe.store.labels import write_labels

    write_labels(cache, list(annotations), classes=classes, out=out, skip_missing=skip_missing)


@cli.command("import-features")
@click.argument("root", type=PATH)
@click.option("--format", "layout", type=click.Choice(["lstr"]), default="lstr", show_default=True,
              help="Layout of ROOT: lstr = rgb_*/, flow_*/, target_perframe/ with VID.npy (T, D).")
@path_option("--out", type=OUT_FOLDER, required=True, help="Cache folder to create (features + labels.h5).")
@path_option("--data-info", help="LSTR's data_info.json: class columns and each split's videos (default: "
                                 "ROOT/data_info.json if there, else built-in THUMOS'14 / TVSeries).")
@click.option("--dataset", default=None,
              help="Its entry: THUMOS, TVSeries, ... (default: recognised from the target columns).")
@click.option("--rgb-dir", default=None, help="RGB feature folder in ROOT (default: the only rgb_*).")
@click.option("--flow-dir", default=None, help="Flow feature folder in ROOT (default: the only flow_*).")
def import_features(root: str, layout: str, out: str, data_info: str | None, dataset: str | None,
                    rgb_dir: str | None, flow_dir: str | None) -> None:
    """Convert public precomputed features (LSTR/TeSTra/MAT layout) in ROOT into a cache.

    An export of vidpipe (`vidpipe export-features`) comes back as the cache it was made from.
    """
    from vidpipe.store.importers import import_lstr

    report = import_lstr(root, out, dataset=dataset, data_info=data_info, rgb_dir=rgb_dir,
                         flow_dir=flow_dir)
    click.echo(f"{out}: {len(report.imported)} videos imported, {len(report.skipped)} already there"
               + (f", {len(report.unsplit)} in no split" if report.unsplit else ""))


@cli.command("export-features")
@click.argument("cache", type=PATH)
@click.argument("out", type=OUT_FOLDER)
@click.option("--format", "layout", type=click.Choice(["lstr"]), default="lstr", show_default=True,
              help="lstr = LSTR/TeSTra/MAT: rgb_*/, flow_*/, target_perframe/ with VID.npy, "
                   "and data_info.json.")
@path_option("--labels", help="labels.h5 (default: CACHE/labels.h5); only labelled videos are exported.")
@click.option("--rgb-dir", default=None,
              help="RGB folder name (default: the recipe's or import's, else LSTR's name for its width).")
@click.option("--flow-dir", default=None, help="Flow folder name (default: as for --rgb-dir).")
@click.option("--data-name", default=None,
              help="data_info.json entry = their DATA.DATA_NAME (default: THUMOS for THUMOS'14 "
                   "classes, else TVSeries, whose data loader is the generic one).")
def export_features(cache: str, out: str, layout: str, labels: str | None, rgb_dir: str | None,
                    flow_dir: str | None, data_name: str | None) -> None:
    """Write a labelled cache to OUT in the LSTR/TeSTra/MAT layout (float32 .npy features
    and targets, data_info.json) so those codebases train on it unchanged."""
    from vidpipe.store.exporters import export_lstr

    click.echo(export_lstr(cache, out, labels=labels, rgb_dir=rgb_dir, flow_dir=flow_dir,
                           data_name=data_name).summary())


# --- model / train / eval -----------------------------------------------------------------

@cli.command()
@path_option("--config", help="Model + training config (configs/*.yaml); optional with --resume.")
@labelled_cache_options
@path_option("--out", type=OUT_FOLDER, required=True, help="Run folder, e.g. runs/NAME.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt.")
@path_option("--init-from", help="Start from this checkpoint's weights (new optimiser; the classifier is "
                                 "re-initialised when the class count differs), e.g. to adapt a model to your classes.")
@set_option("model.sparse_k=290")
@click.option("--epochs", default=None, type=int, help="Shortcut for --set train.epochs=N.")
@click.option("--lr", default=None, type=float, help="Shortcut for --set train.lr=X.")
@click.option("--batch-size", default=None, type=int, help="Shortcut for --set train.batch_size=N (global).")
@click.option("--seed", default=None, type=int, help="Shortcut for --set train.seed=N.")
@click.option("--log-every", "log_every_s", default=HEARTBEAT_S, show_default=True,
              type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Off a terminal (a log file, CI), a progress line with an ETA this often "
                   "during an epoch.")
@device_option()
def train(config: str | None, cache: str, labels: str | None, out: str, resume: bool,
          init_from: str | None, overrides: tuple[str, ...], epochs: int | None, lr: float | None,
          batch_size: int | None, seed: int | None, log_every_s: float, device: str | None) -> None:
    """Train MALT on the train split of CACHE; the same command under torchrun uses DDP."""
    if config is None and not resume:
        raise click.UsageError("--config is required (except with --resume)")
    if not resume and (Path(out) / "last.pt").is_file():   # the library names its argument
        raise VidpipeError(f"{out}: already holds a run (last.pt); pass --resume to continue it "
                           "or choose another --out")
    from vidpipe.malt.train import train as train_model

    shortcuts = [f"train.{key}={value!r}" for key, value in
                 (("epochs", epochs), ("lr", lr), ("batch_size", batch_size), ("seed", seed))
                 if value is not None]
    try:
        history = train_model(config, cache, out, labels=labels, overrides=[*overrides, *shortcuts],
                              resume=resume, device=device, init_from=init_from, log_every_s=log_every_s)
    except KeyboardInterrupt as exc:   # Ctrl-C or SIGTERM: saves are atomic, last.pt is whole
        kept = (f"{out}/last.pt holds the last finished epoch; rerun the same command with "
                "--resume to continue" if (Path(out) / "last.pt").is_file() else "no epoch had finished")
        raise Interrupted(kept) from exc
    if history:
        click.echo(f"{out}: {len(history)} epochs; last: "
                   + ", ".join(f"{k}={v:.4g}" for k, v in history[-1].items()
                               if k.startswith(("train_loss", "val_", "test_"))))


@cli.command("eval")
@path_option("--checkpoint", help="e.g. runs/NAME/best.pt: per-frame mAP/mcAP, and the event metrics "
                                  "of its streaming detector with its event rules")
@path_option("--timelines", help="Folder of timeline JSON files `vidpipe detect` wrote: event metrics "
                                 "of what it emitted (instead of --checkpoint).")
@labelled_cache_options
@click.option("--split", default=None, help="Split to evaluate (default: the config's test split).")
@path_option("--out", type=OUT_FILE, help="Write the results as JSON.")
@device_option()
@click.option("--batch-size", default=64, show_default=True, help="Windows per forward pass.")
@click.option("--protocol", type=click.Choice(["sliding", "chunks"]), default="sliding",
              show_default=True,
              help="Which steps are scored, by which window output (S = short-memory steps). "
                   "sliding: every step t, by the last output of the window ending at t (stride 1; "
                   "LSTR's batch inference, what streaming outputs). chunks: non-overlapping "
                   "windows ending at t = S-1, 2S-1, ... while t+1 < T, every output of each "
                   "scored; later steps are not scored (the trainer's test phase of LSTR and the "
                   "MALT authors, behind the published numbers).")
@path_option("--picture", type=OUT_FILE,
             help="PNG of start p-mAP vs offset and the latency histogram (default with --out: OUT.png).")
@click.option("--frames-only", is_flag=True, help="Per-frame metrics only (no event metrics).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16", "auto"]), default="fp32",
              show_default=True, help="The model's (docs/malt.md, 'Precision'); auto: bf16 for the frame "
                                      "metrics, the detector's auto (int8 on VNNI CPUs) for the events.")
def eval_command(checkpoint: str, cache: str, labels: str | None, split: str | None,
                 out: str | None, device: str | None, batch_size: int, protocol: str,
                 precision: str, **event_options) -> None:
    """Per-frame mAP (THUMOS protocol) and mcAP (TVSeries protocol) of a checkpoint, and the
    event metrics (action starts, segments, latency) of what detect emits."""
    from vidpipe.pipeline.score import event_evaluation

    timelines, picture = event_options["timelines"], event_options["picture"]
    if (checkpoint is None) == (timelines is None):
        raise click.UsageError("give --checkpoint or --timelines (one of them)")
    if timelines is not None:
        click.echo(event_evaluation(cache, labels, split, timelines=timelines, out=out,
                                    picture=picture)[1])
        return
    require_checkpoint_file(checkpoint)
    from vidpipe.malt.evaluate import evaluate
    from vidpipe.malt.metrics import format_table

    report = evaluate(checkpoint, cache, labels=labels, split=split, out=out, device=device,
                      batch_size=batch_size, protocol=protocol, precision=precision)
    click.echo(f"{checkpoint} (epoch {report['epoch']}); model selection of its run: "
               f"{report['selection']}")
    click.echo(format_table(report))
    click.echo(f"{report['num_videos']} videos, {report['num_frames']} frames (split "
               f"'{report['split']}', protocol {protocol}): mAP {100 * report['mAP']:.2f}, mcAP {100 * report['mcAP']:.2f}"
               + (f"; written to {out}" if out else ""))
    if not event_options["frames_only"]:
        click.echo(event_evaluation(cache, labels, split, checkpoint=checkpoint, device=device,
                                    out=out, picture=picture, frame_report=report, precision=precision)[1])


@cli.command()
@path_option("--checkpoint", required=True, help="Trained model (run folder's last.pt or best.pt).")
@labelled_cache_options
@click.option("--split", default="val", show_default=True,
              help="Videos to choose on: a split of the labels, or 'val': the run's validation videos "
                   "(data.val_split, or those data.val_fraction held out). The test split is refused.")
@click.option("--objective", type=click.Choice(["f1", "start-ap", "latency"]), default="f1",
              show_default=True,
              help="f1: segment F1@0.25; start-ap: start p-mAP over offsets 1..10 s; latency: lowest "
                   "median start latency within 90%% of the best F1.")
@device_option()
def calibrate(checkpoint: str, cache: str, labels: str | None, split: str, objective: str,
              device: str | None) -> None:
    """Choose the event rules (per-class start/end thresholds, smoothing, minimum duration) on
    validation videos; written beside the checkpoint, detect and eval then use them."""
    require_checkpoint_file(checkpoint)
    from vidpipe.pipeline.calibrate import calibrate as run_calibrate, describe_rules, rules_path

    rules = run_calibrate(checkpoint, cache, labels, split=split, objective=objective, device=device)
    click.echo(describe_rules(rules, rules_path(checkpoint)))


@cli.command("model-info")
@click.option("--config", "config_path", type=click.Path(), default=None,
              help="YAML config (its `model:` section); default: the paper's THUMOS settings.")
@set_option("model.decoder=cascaded")
@click.option("--params-only", is_flag=True,
              help="Parameters only: skip measuring multiply-adds (instant at any size).")
def model_info(config_path: str | None, overrides: tuple[str, ...], params_only: bool) -> None:
    """Parameters per block and multiply-adds per streaming step / per window."""
    from vidpipe.malt.info import describe_model

    click.echo(describe_model(config_path, overrides, macs=not params_only))


# --- detect / demo ------------------------------------------------------------------------

@cli.command()
@click.argument("source_args", metavar="[SOURCE]...", nargs=-1)
@click.option("--source", "source_opts", metavar="SOURCE", multiple=True,
              help="Video file, folder of videos, RTSP/HTTP URL, device (/dev/video0) or id of a "
                   "video in --cache; same as a SOURCE argument (repeatable).")
@path_option("--checkpoint", required=True, help="Trained model (run folder's best.pt or last.pt).")
@path_option("--out", type=OUT_FOLDER, help="Output folder (default: <checkpoint's run folder>/detections).")
@path_option("--cache", help="Feature cache to reuse: videos it holds are not decoded again.")
@click.option("--live", is_flag=True, help="Print start/end events as they are decided.")
@path_option("--events", type=OUT_FILE, help="Append every start/end event to this JSONL file as it is decided.")
@path_option("--render", type=OUT_FILE,
             help="Write the video with the decisions drawn on it (OUT.mp4; several sources: "
                  "<name>.OUT.mp4 each, beside OUT.mp4).")
@click.option("--reconnect", default=0, show_default=True, type=click.IntRange(min=0),
              help="Open a dropped URL/device again up to N times in a row (back-off 0.5 s, 1 s, ...).")
@click.option("--timeout", "timeout_s", default=10.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Seconds a URL may stay silent before it has failed.")
@click.option("--max-pixels", default=None, type=click.IntRange(min=1),
              help="Pixel budget of one frame (default 4096x4096 = 16777216): a video declaring "
                   "larger frames is refused before decoding.")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="CPU threads for the networks and the model (default: one per core); each live "
                   "source decodes and computes flow in its own single-threaded worker.")
@event_rule_options
@device_option()
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16", "int8", "auto"]), default="fp32",
              show_default=True, help="The model's: fp32 (exact), bf16, fp16 (GPU), int8 (CPU: int8 linear "
                                      "layers), auto (the fastest the hardware has: docs/malt.md).")
@click.option("--int8", is_flag=True, help="= --precision int8.")
@click.option("--no-picture", "picture", is_flag=True, flag_value=False, default=True,
              help="Skip the PNG timeline.")
@feature_weights_options
def detect(source_args, source_opts, checkpoint, **options) -> None:
    """Online action detection on videos, streams or folders, several at once -> timeline
    JSON / CSV / PNG per source; exit 1 when a source failed, 130 on Ctrl-C (after writing)."""
    sources = [*source_args, *source_opts]
    if not sources:
        raise click.UsageError("give at least one SOURCE (argument or --source)")
    require_checkpoint_file(checkpoint)
    require_sources(sources, cache_given=options["cache"] is not None)
    # Live sources' workers and the engine both start torch's OpenMP regions: threads that
    # spin between regions took the cores from each other (1 live source, 2 threads, a loaded
    # 2-core machine: 44-46 s of CPU, 6 s passive). Read when torch loads: before its import.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from vidpipe.pipeline.detect import detect as run_detect

    if options["max_pixels"] is None:          # the library's budget (extractors.decode)
        del options["max_pixels"]
    detections = run_detect(sources, checkpoint, **options)   # detect's keywords, DetectOptions'
    if any(d.interrupted for d in detections):   # exit 130 / 143, as shells expect
        raise Interrupted(f"the timelines decided so far are written: "
                          f"{', '.join(str(d.files['json']) for d in detections)}")



@cli.command()
@click.option("--out", default="demo_out", show_default=True, type=OUT_FOLDER,
              help="Folder for the generated videos, cache, model and timelines.")
@click.option("--videos", "num_videos", default=48, show_default=True,
              type=click.IntRange(min=2), help="Synthetic videos to generate (1/4 held out).")
@click.option("--duration", default=20.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True), help="Seconds per video.")
@click.option("--epochs", default=None, type=click.IntRange(min=1),
              help="Training epochs (default: those of configs/demo.yaml).")
@device_option("cpu")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the generated videos and the random-init backbones "
                   "(training keeps configs/demo.yaml's train.seed).")
def demo(out, num_videos, duration, epochs, device, seed) -> None:
    """Generate synthetic action videos, extract, train, evaluate and detect: the whole
    chain in a few minutes on a CPU, no data or weights needed."""
    from vidpipe.pipeline.demo import DemoSettings, run_demo

    result = run_demo(out, DemoSettings(num_videos=num_videos, duration_s=duration,
                                        epochs=epochs, seed=seed, device=device))
    click.echo(result.summary())


# --- cache maintenance --------------------------------------------------------------------

@cli.group("cache", cls=PipelineGroup)
def cache_group() -> None:
    """Check a feature cache's files (checksums, settings) and rebuild its manifest."""


@cache_group.command("verify")
@click.argument("cache", type=PATH)
def cache_verify(cache: str) -> None:
    """Check every video file of CACHE and its manifest; exit 1 when anything is damaged."""
    from vidpipe.store.cache import check_cache

    result = check_cache(cache)
    click.echo(result.report())
    if not result.ok:
        raise BatchIncomplete(f"{cache}: damaged; `vidpipe cache repair {cache}` sets damaged "
                              "files aside and rebuilds the manifest")


@cache_group.command("repair")
@click.argument("cache", type=PATH)
def cache_repair(cache: str) -> None:
    """Rebuild CACHE's manifest from its files and move damaged files to CACHE/damaged/
    (`vidpipe extract` then extracts those videos again)."""
    from vidpipe.store.cache import check_cache

    click.echo(check_cache(cache, repair=True).report())


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; every failure ends as one line `error: ...` on stderr and an exit code:
    1 a batch finished with failures, 2 a user mistake, 130 Ctrl-C, 143 SIGTERM (stopped
    after keeping what it had: SIGTERM takes Ctrl-C's path, core.stop)."""
    previous_handlers = handle_stop_signals()
    try:
        cli.main(args=argv, standalone_mode=False)
    except (BatchIncomplete, DiskFull) as exc:
        _fail(str(exc), 1)
    except VidpipeError as exc:
        _fail(str(exc), 2)
    except OSError as exc:   # a full disk met outside core.atomic's writes
        full = disk_full(exc, exc.filename)
        if full is None:
            raise
        _fail(str(full), 1)
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:
        kept = what_was_kept(exc)
        click.echo(f"error: {stopped_by()}" + (f": {kept}" if kept else ""), err=True)
        sys.exit(128 + stop_signal())
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        _fail(exc.format_message() + hint, exc.exit_code)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    finally:
        remove_cli_logging()
        restore_signals(previous_handlers)


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def run(argv: list[str] | None = None) -> None:
    """The console script `vidpipe`: `main`, and then, should a stopped run have left a worker
    blocked in a read, exit at once after flushing what was written (finalising the
    interpreter under it would abort, core.stop). Only the program's own entry may end the
    process so: `main` called in-process (tests, other programs) raises SystemExit as usual."""
    try:
        main(argv)
    except SystemExit as exc:
        if blocked_threads():
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exc.code if isinstance(exc.code, int) else 1)
        raise


if __name__ == "__main__":
    run()
