"""`vidpipe extract`: a folder of videos -> a feature cache (the batch job).

Per video: fingerprint the file, skip it when the cache already holds it with the same
fingerprint (the cache's manifest guarantees the same settings), else decode, extract and
write it atomically through `store.cache.FeatureStore`. A bad file is recorded and the
job goes on; the summary names every failure. A kill at any moment loses at most the videos
in progress; rerunning completes the rest with the same numbers.

Decoding runs in `workers` threads ahead of the model (decord, PyAV, OpenCV and torch all
release the GIL). Under torchrun (RANK / WORLD_SIZE set) each rank takes every
WORLD_SIZE-th video of the sorted list; ranks never write the same file.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISBLK, S_ISCHR, S_ISFIFO, S_ISSOCK
from typing import Any, Iterator

from vidpipe.extractors.decode import VIDEO_EXTENSIONS, Chunk, VideoSource
from vidpipe.extractors.features import FeatureSettings, TwoStreamExtractor, stack_steps
from vidpipe.core.config import load_config
from vidpipe.core.distributed import distributed_env, process_device
from vidpipe.core.errors import DiskFull, VidpipeError
from vidpipe.core.memory import release_free_memory
from vidpipe.core.stop import Interrupted, join_threads
from vidpipe.core.log import progress_bar
from vidpipe.core.paths import require_input
from vidpipe.store.cache import FeatureStore, video_id_from_path

FINGERPRINT_BYTES = 1 << 20    # hashed from the head and from the tail of each file
PREFETCH_CHUNKS = 32           # decoded chunks a worker may hold ahead, per video

log = logging.getLogger(__name__)


@dataclass
class VideoJob:
    path: Path                 # the file
    relative: str              # its path relative to the input folder (posix)
    video_id: str
    unlisted: str | None = None   # a folder that could not be listed: why (its videos are unknown)


@dataclass
class ExtractSummary:
    out_dir: str
    rank: int
    world_size: int
    extracted: list[str] = field(default_factory=list)        # relative paths
    skipped: list[str] = field(default_factory=list)          # already cached, unchanged
    failed: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why)
    steps: int = 0
    seconds: float = 0.0
    all_ranks: bool = False     # sums every rank's summary (torchrun)

    @property
    def ok(self) -> bool:
        return not self.failed

    def resume_hint(self, total: int) -> str:
        """What an interrupted run kept, and how to go on."""
        done = len(self.extracted) + len(self.skipped)
        failed = f", {len(self.failed)} failed" if self.failed else ""
        return (f"{self.out_dir}: {done} of {total} videos done ({len(self.extracted)} extracted "
                f"now{failed}); rerun the same command to resume")

    def report(self) -> str:
        total = len(self.extracted) + len(self.skipped) + len(self.failed)
        if self.all_ranks:
            shard = f" (all {self.world_size} ranks)"
        elif self.world_size > 1:
            shard = f" (rank {self.rank} of {self.world_size})"
        else:
            shard = ""
        rate = f", {self.steps / self.seconds:.1f} steps/s" if self.seconds > 0 and self.steps else ""
        lines = [f"{self.out_dir}: {total} videos{shard}: {len(self.extracted)} extracted "
                 f"({self.steps} steps{rate}), {len(self.skipped)} already cached, "
                 f"{len(self.failed)} failed"]
        lines += [f"  failed: {why}" for _, why in self.failed]
        return "\n".join(lines)


def load_settings(config: str | Path | None = None, overrides: tuple[str, ...] | list[str] = (),
                  **options: Any) -> FeatureSettings:
    """Settings from a YAML file, `--set key=value` overrides, then explicit CLI options
    (those not None), in that order of precedence (last wins)."""
    settings = load_config(FeatureSettings, config, list(overrides))
    given = {k: v for k, v in options.items() if v is not None}
    return dataclasses.replace(settings, **given).validate()


def find_videos(input_dir: str | Path) -> list[VideoJob]:
    """Video files under `input_dir` (by extension, sorted), with unique cache ids; then a
    job with `unlisted` set for each folder that could not be listed."""
    root = require_input(input_dir)
    unlisted: list[tuple[Path, str]] = []
    if root.is_file():
        paths, root = [root], root.parent
    elif root.is_dir():
        files, unlisted = _walk(root)
        # Hidden names are metadata, not videos (macOS '._clip.mp4', editors' temporaries).
        named = sorted(p for p in files if p.suffix.lower() in VIDEO_EXTENSIONS
                       and not p.name.startswith("."))
        paths = [p for p in named if _is_regular(p)]
    else:
        raise VidpipeError(f"{input_dir}: {_not_regular(root)}")
    jobs = [VideoJob(p, p.relative_to(root).as_posix(), video_id_from_path(p.relative_to(root)))
            for p in paths]
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.video_id] = counts.get(job.video_id, 0) + 1
    for job in jobs:  # 'a b.mp4' and 'a_b.mp4' would share an id: tell them apart by path
        if counts[job.video_id] > 1:
            digest = hashlib.sha1(job.relative.encode()).hexdigest()[:8]
            job.video_id = f"{job.video_id}-{digest}"
    jobs += [VideoJob(folder, folder.relative_to(root).as_posix() + "/", "", unlisted=why)
             for folder, why in unlisted]   # reported with the bad files, never skipped unsaid
    return jobs


def _walk(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files under `root` (symbolic links to folders not followed) and the folders that
    could not be listed, with why."""
    unlisted: list[tuple[Path, str]] = []
    files: list[Path] = []

    def failed(exc: OSError) -> None:
        unlisted.append((Path(exc.filename), f"cannot list the folder ({exc.strerror or exc}): "
                                             "its videos are not read"))
    for folder, _, names in os.walk(root, onerror=failed):
        files += [Path(folder) / name for name in names]
    if unlisted and unlisted[0][0] == root:
        raise VidpipeError(f"{root}: {unlisted[0][1]}")
    return files, sorted(unlisted)


def _is_regular(path: Path) -> bool:
    """Only regular files are read: a FIFO, socket or device named .mp4 would block the
    fingerprint (and the decoder) forever. Others are skipped with a warning."""
    if path.is_file():
        return True
    log.warning("skipping %s: %s", path, _not_regular(path))
    return False


def _not_regular(path: Path) -> str:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    kinds = {S_ISFIFO: "a FIFO", S_ISSOCK: "a socket", S_ISCHR: "a character device",
             S_ISBLK: "a block device"}
    kind = next((name for test, name in kinds.items() if test(mode)), "a special file")
    return f"not a regular file ({kind}), not read"


def fingerprint(path: Path) -> str:
    """sha256 of the size, the first and the last MiB: changes with any re-encode, cut or
    append (container headers and indexes sit at the ends), without reading whole files."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            handle.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            digest.update(handle.read(FINGERPRINT_BYTES))
    return f"size-head-tail-sha256:{digest.hexdigest()}"


def extract_folder(input_dir: str | Path, out_dir: str | Path, settings: FeatureSettings | None = None,
                   device: str | None = None, workers: int = 0, rank: int | None = None,
                   world_size: int | None = None, progress: bool = True) -> ExtractSummary:
    """Extract every video under `input_dir` into the cache `out_dir`; see the module doc.
    `settings`: `load_settings(...)` (default: configs/extract.yaml's, pretrained backbones)."""
    env = distributed_env(rank, world_size)
    rank, world_size = env.rank, env.world_size
    jobs = find_videos(input_dir)
    if not jobs:   # before the cache exists: an empty folder must not leave an empty cache
        raise VidpipeError(f"{input_dir}: no video files found (looked for "
                           f"{', '.join(VIDEO_EXTENSIONS)})")
    jobs = jobs[rank::world_size]
    extractor = TwoStreamExtractor(settings or load_settings(), process_device(device, env))
    store = FeatureStore.open_or_create(out_dir, extractor.settings_record())
    summary = ExtractSummary(str(out_dir), rank, world_size)

    pending = _pending(jobs, store, summary)

    show = progress and rank == 0
    videos_bar = progress_bar(total=len(pending), enabled=show, unit="video", desc="videos")
    steps_bar = progress_bar(enabled=show, unit="step", desc="steps", position=1, leave=False)
    started = time.perf_counter()
    decoded = _decode_ahead([job for job, _ in pending], extractor, workers)
    into = _Into(store, extractor, summary, steps_bar)
    try:
        deferred = []
        for index, ((job, job_print), (source, chunks)) in enumerate(zip(pending, decoded)):
            videos_bar.set_postfix_str(job.relative[-40:])
            with store.claim(job.video_id) as claim:
                if claim.take(wait=False):
                    into.extract(job, job_print, source, chunks)
                    videos_bar.update(1)
                    continue
            deferred.append((job, job_print))   # another extraction into this cache has it
            decoded.abandon(index)
        for job, job_print in deferred:   # when it is done: skipped, or ours if it failed or died
            with store.claim(job.video_id) as claim:
                claim.take(wait=True)
                into.extract(job, job_print, *_open_video(extractor, job))
            videos_bar.update(1)
    except KeyboardInterrupt as exc:   # Ctrl-C or SIGTERM (core.stop): finished videos are kept
        raise Interrupted(summary.resume_hint(len(jobs))) from exc
    finally:
        decoded.close()
        videos_bar.close()
        steps_bar.close()
    summary.seconds = time.perf_counter() - started
    return _all_ranks(summary)


# -- helpers --------------------------------------------------------------------------------
@dataclass
class _Into:
    """Where claimed videos go: the store, through the extractor; outcomes in the summary."""
    store: FeatureStore
    extractor: TwoStreamExtractor
    summary: ExtractSummary
    steps_bar: Any

    def extract(self, job: VideoJob, job_print: str | None, source: Any,
                chunks: Iterator[Chunk] | None) -> None:
        """Extract one claimed video, unless another extraction into the cache has just done it."""
        try:
            if job_print is not None and _cached_print(self.store, job.video_id) == job_print:
                self.summary.skipped.append(job.relative)
                log.debug("skipped %s: extracted by another run into this cache", job.relative)
                return
            if isinstance(source, BaseException):
                raise source
            steps = self.extractor.stream_chunks(chunks)
            rgb, flow, timestamps = stack_steps(_counted(steps, self.steps_bar), job.path)
            self.store.write(job.video_id, rgb, flow, timestamps,
                             _video_attrs(job, job_print, source, self.extractor))
            self.summary.extracted.append(job.relative)
            self.summary.steps += len(timestamps)
            log.info("extracted %s: %d steps", job.relative, len(timestamps))
        except DiskFull:   # every next video would fail the same way: stop, keep what is done
            raise
        except Exception as exc:  # a bad file must not stop the batch: record why
            self.summary.failed.append((job.relative, _failure(job, exc)))
            log.warning("failed: %s", self.summary.failed[-1][1])
        finally:
            if chunks is not None:
                chunks.close()   # stops its decoding if abandoned half-way
            release_free_memory()   # bounds the heap's creep over long jobs (core.memory)


def _open_video(extractor: TwoStreamExtractor, job: VideoJob) -> tuple[Any, Iterator[Chunk] | None]:
    """(source, chunks) of one video, decoded here; (the error, None) when it cannot be opened."""
    try:
        source = extractor.source(job.path)
    except Exception as exc:
        return exc, None
    return source, source.chunks()


def _pending(jobs: list[VideoJob], store: FeatureStore,
             summary: ExtractSummary) -> list[tuple[VideoJob, str | None]]:
    """(job, fingerprint) of the videos to extract; cached unchanged ones are counted as
    skipped, folders that could not be listed as failed."""
    pending = []
    for job in jobs:
        if job.unlisted:
            summary.failed.append((job.relative, f"{job.path}: {job.unlisted}"))
            log.warning("failed: %s", summary.failed[-1][1])
            continue
        try:
            job_print = fingerprint(job.path)
        except OSError:
            job_print = None   # unreadable: decoding will say why
        if job_print is not None and _cached_print(store, job.video_id) == job_print:
            summary.skipped.append(job.relative)
            log.debug("skipped %s: cached, unchanged", job.relative)
        else:
            pending.append((job, job_print))
    return pending


def _all_ranks(summary: ExtractSummary) -> ExtractSummary:
    """Under torchrun, wait for every rank and sum their summaries (each rank reports the
    whole job; a rank with failures no longer ends before the others, which torchrun would
    answer by stopping them). Other launchers (RANK/WORLD_SIZE only): this rank's share."""
    if summary.world_size == 1 or "MASTER_ADDR" not in os.environ:
        return summary
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))  # ranks may take hours
    gathered: list[ExtractSummary | None] = [None] * summary.world_size
    dist.all_gather_object(gathered, summary)
    dist.destroy_process_group()
    total = ExtractSummary(summary.out_dir, summary.rank, summary.world_size,
                           seconds=max(s.seconds for s in gathered), all_ranks=True)
    for part in gathered:
        total.extracted += part.extracted
        total.skipped += part.skipped
        total.failed += part.failed
        total.steps += part.steps
    return total


def _cached_print(store: FeatureStore, video_id: str) -> str | None:
    """The source fingerprint of a sound cached file; None (extract again) when the video is
    not cached or its file is damaged, incomplete or made with other settings."""
    if video_id not in store:
        return None
    problem = store.check(video_id)
    if problem is not None:
        log.warning("extracting again: %s", problem)
        return None
    return store.attrs(video_id).get("fingerprint")


def _video_attrs(job: VideoJob, job_print: str | None, source: VideoSource,
                 extractor: TwoStreamExtractor) -> dict[str, Any]:
    stat = job.path.stat()
    info = source.info
    return {
        "source_path": job.relative,
        "source_abspath": str(job.path.resolve()),
        "source_size": stat.st_size,
        "source_mtime": stat.st_mtime,
        "fingerprint": job_print or fingerprint(job.path),
        "duration": source.decoded_end if source.decoded_end is not None else (info.duration or 0.0),
        "native_fps": info.native_fps or 0.0,
        "width": info.width,
        "height": info.height,
        "codec": info.codec,
        "decoder": source.backend_used,
        "timestamp_restarts": source.restarts,   # continued on the step clock (extractors.decode)
        "extracted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extractor.run_record(),
    }


def _failure(job: VideoJob, exc: BaseException) -> str:
    """One line naming the file and why it failed."""
    if isinstance(exc, VidpipeError):
        message = str(exc)
    else:  # not a known bad-input case: keep the traceback's last line for the report
        message = f"unexpected {type(exc).__name__}: {exc}"
        log.error("%s: unexpected %s", job.path, type(exc).__name__, exc_info=exc)
    return message if str(job.path) in message else f"{job.path}: {message}"


def _counted(steps: Iterator, bar: Any) -> Iterator:
    for step in steps:
        bar.update(1)
        yield step


class _decode_ahead:
    """(source, chunks) per job, in order; with workers > 0 threads decode ahead.

    A job whose source cannot be opened yields (the VidpipeError, None); an error while
    decoding is raised from its chunks iterator, in the consumer's thread.
    """

    def __init__(self, jobs: list[VideoJob], extractor: TwoStreamExtractor, workers: int):
        self.jobs = jobs
        self.extractor = extractor
        self.workers = workers
        self.stop = threading.Event()
        if workers > 0:
            self.queues: list[queue.Queue] = [queue.Queue(maxsize=PREFETCH_CHUNKS) for _ in jobs]
            self.abandoned: set[int] = set()   # videos the consumer gave up on (failed)
            self.next_job = iter(range(len(jobs)))
            self.lock = threading.Lock()
            self.threads = [threading.Thread(target=self._work, daemon=True, name=f"decode-{i}")
                            for i in range(workers)]
            for thread in self.threads:
                thread.start()

    def __iter__(self) -> Iterator[tuple[Any, Iterator[Chunk] | None]]:
        for index, job in enumerate(self.jobs):
            if self.workers == 0:
                try:
                    source = self.extractor.source(job.path)
                except Exception as exc:
                    yield exc, None
                    continue
                yield source, source.chunks()
            else:
                kind, value = self.queues[index].get()
                yield (value, self._drain(index)) if kind == "source" else (value, None)

    def _drain(self, index: int) -> Iterator[Chunk]:
        try:
            while True:
                kind, value = self.queues[index].get()
                if kind == "chunk":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            self.abandoned.add(index)   # the worker stops decoding it, if still busy

    def _work(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                index = next(self.next_job, None)
            if index is None:
                return
            try:
                source = self.extractor.source(self.jobs[index].path)
            except Exception as exc:
                self._put(index, ("open-error", exc))
                continue
            self._put(index, ("source", source))
            try:
                for chunk in source.chunks():
                    if not self._put(index, ("chunk", chunk)):
                        break
                else:
                    self._put(index, ("end", None))
            except Exception as exc:
                self._put(index, ("error", exc))

    def _put(self, index: int, item: tuple[str, Any]) -> bool:
        """Queue an item for the consumer; False once it gave up on this video or on all."""
        while not self.stop.is_set() and index not in self.abandoned:
            try:
                self.queues[index].put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def abandon(self, index: int) -> None:
        """The consumer will not read this video's chunks: stop decoding it."""
        if self.workers > 0:
            self.abandoned.add(index)

    def close(self) -> None:
        self.stop.set()
        if self.workers > 0:   # none may outlive the run (core.stop says why)
            join_threads(self.threads)
