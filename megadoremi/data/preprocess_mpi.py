"""Distributed preprocessing over MPI ranks (``mpiexec -n R`` or ``srun``), merged without a shared filesystem.

Split: the input files are seen as one concatenated byte stream cut into R equal ranges. A plain file is cut at
any byte and a line belongs to the range that holds its first byte; a .gz (or empty) file cannot be cut and goes
whole to the rank whose range holds its first byte. Ranks count the lines of the part of a file they share with
later ranks (memchr speed) and an ``Exscan`` gives every rank the global number of its first line, so bad input
is reported as ``file:line`` with the same numbers as a single-process run.

Tokenize: every rank runs the single-process pipeline (with its own ``--workers``) on its ranges. Rank 0 writes
straight into the final datasets (its ranges come first); the other ranks write raw part files (tokens, lengths)
into a private temporary directory under ``--tmp-dir`` (node-local, or the output directory).

Agree: one ``allreduce`` of the failure flags (plus the non-blank line counts of files split across ranks, to
spot empty ones) and an ``allgather`` of the error messages, so every rank takes the same decision. A rank that
fails first tells the others with a point-to-point message, which they poll for between chunks, so nobody keeps
tokenizing for hours for a run that is already lost.

Merge: for each key, rank 0 asks ranks 1..R-1 in order for their part; each streams it as messages of at most
``_MERGE_CHUNK_TOKENS`` tokens (a header, the lengths, the tokens; numpy buffers, no pickling) and rank 0
appends them with ``IndexedDatasetWriter.add_sequences``. Memory stays bounded on both sides and parts never need
to be visible to rank 0's filesystem. If rank 0 cannot write, it keeps receiving (and dropping) the remaining
messages so no sender blocks forever, then broadcasts the outcome; only on success are the outputs renamed into
place. Every rank deletes its temporary directory whatever happens.

Signals: Ctrl-C (mpiexec forwards it) or SIGTERM (Slurm) interrupts tokenizing at once, but is only recorded
while a rank is inside a collective or the merge protocol and acted on at the next safe point, so an interrupted
rank still takes part in the agreement and nobody waits forever for it. Input files must be readable at the same
path on every rank (each reads its own byte ranges); only the parts and the merge avoid a shared filesystem.
"""

import bisect
import contextlib
import os
import shutil
import signal
import time

import numpy as np

from megadoremi.data.indexed_dataset import IndexedDatasetWriter, best_dtype
from megadoremi.data.output_files import make_host_temp_dir, writing
from megadoremi.data.preprocess import (
    EMPTY_FILE,
    InputFile,
    InputRange,
    IssueReporter,
    PreprocessConfig,
    PreprocessError,
    PreprocessInputError,
    PreprocessStats,
    Progress,
    empty_file_detail,
    empty_input_message,
    load_tokenizer,
    log_summary,
    part_root,
    remove_stale_temporaries,
    resolve_inputs,
    run_single,
    tokenize_ranges,
)
from megadoremi.utils.cli import UserError
from megadoremi.utils.logging import get_logger

logger = get_logger(__name__)

_TAG_ABORT, _TAG_GO, _TAG_HEADER, _TAG_LENGTHS, _TAG_TOKENS = 101, 102, 103, 104, 105
_DATA, _END_OK, _END_FAILED = 0, 1, 2
_MERGE_CHUNK_TOKENS = 8 << 20
_LENGTHS_PER_READ = 1 << 20
# Variables that launchers set with the number of processes.
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")


class DistributedRunError(PreprocessError):
    """The distributed run failed; ``quiet`` on ranks other than the one that reports it."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


class DistributedInputError(DistributedRunError, UserError):
    """The distributed run failed because of the user's input (on some rank): every rank exits 2."""


def _run_error(message: str, quiet: bool, user: bool) -> DistributedRunError:
    return (DistributedInputError if user else DistributedRunError)(message, quiet=quiet)


class _PeerFailed(Exception):
    """Another rank failed: stop tokenizing."""


def _as_int(value: str | None) -> int:
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0


def mpi_launch_hint(environ=None) -> str | None:
    """The variable showing this process was launched as one of several MPI/srun tasks, or None."""
    env = os.environ if environ is None else environ
    for var in _SIZE_VARS:
        if _as_int(env.get(var)) > 1:
            return f"{var}={env[var]}"
    if "PMIX_RANK" in env:
        return "PMIX_RANK"
    # Inside an sbatch script SLURM_NTASKS is set too; only an srun step also sets SLURM_STEP_ID.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and _as_int(env.get("SLURM_NTASKS")) > 1:
        return f"SLURM_NTASKS={env['SLURM_NTASKS']}"
    return None


def get_world_comm(mode: str):
    """COMM_WORLD when running distributed (``mode`` auto: when the launcher says so; mpi: always), else None.

    mpi4py is imported only then: importing it initializes MPI, which is slow and can fail on a login node.
    """
    if mode == "off":
        return None
    hint = mpi_launch_hint()
    if mode == "auto" and hint is None:
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise PreprocessInputError(
            f"this looks like an MPI/srun launch ({hint}) but mpi4py is not installed: install it "
            "(pip install mpi4py) or pass --distributed off (every task would then write the same output)"
            if hint else "--distributed mpi needs mpi4py (pip install mpi4py)"
        ) from None
    comm = MPI.COMM_WORLD
    # An MPI launcher's own size variable outranks Slurm's (mpiexec -n 1 inside a multi-task srun step is fine).
    mpi_sizes = [_as_int(os.environ[var]) for var in _SIZE_VARS[:3] if var in os.environ]
    single_by_mpi = bool(mpi_sizes) and max(mpi_sizes) == 1
    if hint is not None and comm.Get_size() == 1 and "=" in hint and _as_int(hint.split("=", 1)[1]) > 1 \
            and not single_by_mpi:
        # Every task would be its own world of 1 and write the same outputs to the same paths.
        raise PreprocessInputError(
            f"launched as one of several tasks ({hint}) but MPI sees a world of 1: the launcher gives MPI no "
            "working process-management interface (with srun and pip's MPICH use srun --mpi=pmi2; or run "
            "under mpiexec), or pass --distributed off and launch a single task"
        )
    return comm if comm.Get_size() > 1 else None


def split_ranges(files: list[InputFile], num_parts: int) -> list[list[InputRange]]:
    """Cut the files, seen as one concatenated byte stream, into ``num_parts`` contiguous ranges.

    Plain files are cut anywhere (a line belongs to the range holding its first byte); a .gz or empty file goes
    whole to the part whose range holds its first byte. Parts keep file order, so concatenating the parts'
    outputs in part order gives the single-process output.
    """
    total = sum(f.size for f in files)
    bounds = [total * part // num_parts for part in range(num_parts + 1)]

    def owner(offset: int) -> int:
        # The last part whose range starts at or before offset (so empty ranges are skipped).
        return min(bisect.bisect_right(bounds, offset) - 1, num_parts - 1)

    parts: list[list[InputRange]] = [[] for _ in range(num_parts)]
    offset = 0
    for index, f in enumerate(files):
        if f.compressed or f.size == 0:
            parts[owner(offset)].append(InputRange(index, 0, f.size))
        else:
            for part in range(owner(offset), num_parts):
                if bounds[part] >= offset + f.size:
                    break
                lo, hi = max(offset, bounds[part]), min(offset + f.size, bounds[part + 1])
                if lo < hi:
                    parts[part].append(InputRange(index, lo - offset, hi - offset))
        offset += f.size
    return parts


def count_line_starts(path: str, start: int, end: int) -> int:
    """Number of lines of a plain file whose first byte lies in ``[start, end)`` (memchr speed)."""
    size = os.path.getsize(path)
    end = min(end, size)
    if start >= end:
        return 0
    count = 1 if start == 0 else 0
    # A line starts after every newline at p with p + 1 in [start, end) and p + 1 < size.
    lo, hi = max(start - 1, 0), min(end - 1, size - 1)
    with open(path, "rb") as handle:
        handle.seek(lo)
        remaining = hi - lo
        while remaining > 0:
            block = handle.read(min(remaining, 16 << 20))
            if not block:
                break
            count += block.count(b"\n")
            remaining -= len(block)
    return count


class PartWriter:
    """One rank's share of one key's dataset as two raw files (tokens, int32 lengths): one document = one
    sequence, never a valid-looking .bin/.idx pair, streamed back in bounded chunks."""

    def __init__(self, directory: str, name: str, dtype):
        self.dtype = np.dtype(dtype)
        self.tokens_path = os.path.join(directory, f"{name}.tokens")
        self.lengths_path = os.path.join(directory, f"{name}.lengths")
        with writing(self.tokens_path):
            self._tokens = open(self.tokens_path, "wb")
        with writing(self.lengths_path):
            self._lengths = open(self.lengths_path, "wb")

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append single-sequence documents: ``tokens`` concatenated, ``lengths`` one per document."""
        with writing(self.tokens_path):
            self._tokens.write(np.asarray(tokens, self.dtype).tobytes())
        with writing(self.lengths_path):
            self._lengths.write(np.asarray(lengths, np.int32).tobytes())

    def close(self) -> None:
        with writing(self.tokens_path):
            self._tokens.close()
        with writing(self.lengths_path):
            self._lengths.close()

    def iter_chunks(self, max_tokens: int):
        """(tokens, lengths) of consecutive documents, at most ``max_tokens`` tokens (or one document) each."""
        self.close()
        itemsize = self.dtype.itemsize
        with open(self.lengths_path, "rb") as lengths_file, open(self.tokens_path, "rb") as tokens_file:
            while True:
                raw = lengths_file.read(4 * _LENGTHS_PER_READ)
                if not raw:
                    return
                lengths = np.frombuffer(raw, np.int32)
                ends = np.cumsum(lengths, dtype=np.int64)
                first, consumed = 0, 0
                while first < lengths.size:
                    stop = max(int(np.searchsorted(ends, consumed + max_tokens, side="right")), first + 1)
                    num_tokens = int(ends[stop - 1]) - consumed
                    data = tokens_file.read(num_tokens * itemsize)
                    if len(data) != num_tokens * itemsize:
                        raise PreprocessError(f"{self.tokens_path}: part file is truncated")
                    yield np.frombuffer(data, self.dtype), lengths[first:stop]
                    first, consumed = stop, int(ends[stop - 1])


class _DeferredSignals:
    """Records SIGINT/SIGTERM instead of raising while ranks are in collectives or the merge protocol.

    A rank that raised KeyboardInterrupt in the middle of a collective would leave the others waiting forever;
    outside ``allowed()`` blocks a signal is only recorded, and acted on at the next safe point.
    """

    _SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _record(self, signum, frame) -> None:
        self.signum = signum

    def defer(self) -> None:
        try:
            for signum in self._SIGNALS:
                previous = signal.signal(signum, self._record)
                self._previous.setdefault(signum, previous)
        except ValueError:  # not the main thread: signals cannot be handled here anyway
            pass

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def interrupt(self) -> BaseException:
        """The exception the original handler raises for the recorded signal."""
        handler = self._previous.get(self.signum, signal.getsignal(self.signum))
        if callable(handler):
            try:
                handler(self.signum, None)
            except BaseException as raised:
                return raised
        return KeyboardInterrupt()

    @contextlib.contextmanager
    def allowed(self):
        """Signals raise as usual inside the block (one recorded before it is raised on entry)."""
        if self.signum is not None:
            raise self.interrupt()
        self.restore()
        try:
            yield
        finally:
            self.defer()


def run_preprocess(config: PreprocessConfig) -> PreprocessStats:
    """Tokenize ``config.inputs`` into one dataset per JSON key: over MPI ranks when launched so (``mpiexec``,
    ``srun``; see ``config.distributed``), else in this process (``run_single``)."""
    config.validate()
    comm = get_world_comm(config.distributed)
    if comm is not None:
        return run_distributed(config, comm)
    return run_single(config)


def run_distributed(config: PreprocessConfig, comm) -> PreprocessStats:
    """Tokenize on every rank of ``comm`` and merge on rank 0; every rank returns or raises alike."""
    return _DistributedRun(config, comm).run()


class _DistributedRun:
    """One rank's side of a distributed run: set up, tokenize its share, agree, merge, clean up."""

    def __init__(self, config: PreprocessConfig, comm):
        from mpi4py import MPI

        self.MPI = MPI
        self.config = config
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.writers: list[IndexedDatasetWriter] = []
        self.finalized = False
        self.parts: list[PartWriter] = []
        self.tmp_dir: str | None = None
        self.abort_requests: list = []
        self.aborts_received: set[int] = set()
        self.files: list[InputFile] = []
        self.tokenizer = None
        self.dtype = None
        self.all_ranges: list[list[InputRange]] = []

    # -------------------------------------------------------------------------------------------- driver
    def run(self) -> PreprocessStats:
        started = time.perf_counter()
        comm, rank = self.comm, self.rank
        signals = _DeferredSignals()
        interrupt = None
        signals.defer()
        try:
            # Inputs are resolved once, on rank 0, so every rank splits exactly the same list.
            files, error = None, None
            if rank == 0:
                try:
                    files = resolve_inputs(self.config.inputs)
                except PreprocessError as failure:
                    error = str(failure)
            files, error = comm.bcast((files, error), root=0)
            self.hosts = comm.allgather(self.MPI.Get_processor_name())  # each rank's node, for the log
            if error:
                raise DistributedInputError(error, quiet=rank != 0)
            self.files = files

            stats, error, user_error = None, None, False
            try:
                ranges, first_lines = self._set_up()
                with signals.allowed():
                    stats = self._tokenize(ranges, first_lines)
            except _PeerFailed:
                error = ""
            except KeyboardInterrupt as caught:
                interrupt, error = caught, "interrupted"
                self._notify_abort()
            except (PreprocessError, OSError, ValueError) as failure:
                error, user_error = str(failure), isinstance(failure, UserError)
            except Exception as failure:
                logger.exception("rank %d failed", rank)
                error = f"{type(failure).__name__}: {failure}"
                self._notify_abort()
            try:
                stats = self._agree(stats, error, user_error)
                self._merge(signals)
            except DistributedRunError:
                # An interrupted rank exits as interrupted (130/143); the others as failed.
                if interrupt is not None:
                    raise interrupt from None
                if signals.signum is not None:
                    raise signals.interrupt() from None
                raise
            if signals.signum is not None:
                logger.warning("signal %d arrived after the outputs were complete; ignored", signals.signum)
            stats.seconds = time.perf_counter() - started
            if rank == 0:
                log_summary(stats, self.config)
            return stats
        finally:
            signals.restore()
            self._clean_up()

    def _set_up(self) -> tuple[list[InputRange], list[int]]:
        """Load the tokenizer, open the outputs, and number the first line of every range (collective)."""
        comm, rank = self.comm, self.rank
        failed = 0
        counts = np.zeros(len(self.files), np.int64)
        self.all_ranges = split_ranges(self.files, self.size)
        ranges = self.all_ranges[rank]
        try:
            self.tokenizer = load_tokenizer(self.config.tokenizer_model)
            self.dtype = best_dtype(self.tokenizer.vocab_size)
            # Rank 0 sweeps the outputs' directory; every rank its own part root (node-local or shared).
            remove_stale_temporaries(self.config, outputs=rank == 0)
            # Lines of the file this rank shares with the next ranks, for their line numbers.
            if ranges:
                last = ranges[-1]
                f = self.files[last.file_index]
                if not f.compressed and last.end < f.size:
                    counts[last.file_index] = count_line_starts(f.path, last.start, last.end)
            if rank == 0:
                for key in self.config.json_keys:
                    self.writers.append(IndexedDatasetWriter(self.config.output_prefix_for(key), self.dtype))
            else:
                self.tmp_dir = self._make_tmp_dir()
                self.parts = [PartWriter(self.tmp_dir, f"part{index}", self.dtype)
                              for index in range(len(self.config.json_keys))]
        except BaseException:
            failed = 1
            raise
        finally:
            # Collectives run on every rank whatever happened locally, in the same order.
            lines_before = np.zeros_like(counts)
            comm.Exscan(counts, lines_before, op=self.MPI.SUM)
            if rank == 0:
                lines_before[:] = 0
            if comm.allreduce(failed, op=self.MPI.MAX):
                if not failed:
                    raise _PeerFailed()
        first_lines = [1 + (int(lines_before[r.file_index]) if r.start > 0 else 0) for r in ranges]
        return ranges, first_lines

    def _make_tmp_dir(self) -> str:
        root = part_root(self.config)
        with writing(root):
            return make_host_temp_dir(root, os.path.basename(self.config.output_prefix), f"rank{self.rank}")

    def _tokenize(self, ranges: list[InputRange], first_lines: list[int]) -> PreprocessStats:
        config, rank = self.config, self.rank
        total = sum(r.end - r.start for r in ranges)
        logger.info("rank %d/%d: %d range(s), %.2f MB, %d worker(s); ranks on %s", rank, self.size, len(ranges),
                    total / 1e6, config.workers, ", ".join(self.hosts))
        progress = Progress(total, config.progress_bar, config.log_interval_s, config.log_interval_docs,
                            label="tokenizing (rank 0 share)", enabled=rank == 0)
        sinks = self.writers if rank == 0 else self.parts
        try:
            return tokenize_ranges(self.files, ranges, first_lines, sinks, self.tokenizer, config, progress,
                                   IssueReporter(self.files, config.strict, config.max_reported),
                                   start_method="forkserver", poll=self._poll_abort)
        except (_PeerFailed, KeyboardInterrupt):
            raise
        except BaseException as failure:
            if rank != 0:  # rank 0 reports the first failure after the agreement
                logger.error("%s", failure)
            self._notify_abort()
            raise
        finally:
            progress.close()

    # ------------------------------------------------------------------------------------- failures
    def _notify_abort(self) -> None:
        """Tell every other rank (once) to stop tokenizing."""
        if self.abort_requests:
            return
        self.abort_requests = [self.comm.isend(self.rank, dest=peer, tag=_TAG_ABORT)
                               for peer in range(self.size) if peer != self.rank]

    def _poll_abort(self) -> None:
        status = self.MPI.Status()
        if self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=_TAG_ABORT, status=status):
            self.aborts_received.add(self.comm.recv(source=status.Get_source(), tag=_TAG_ABORT))
            raise _PeerFailed()

    def _agree(self, stats: PreprocessStats | None, error: str | None, user_error: bool) -> PreprocessStats:
        """Collective: the same success/failure decision everywhere, totals on rank 0, empty split files."""
        comm, rank, config = self.comm, self.rank, self.config
        num_files, num_keys = len(self.files), len(config.json_keys)
        # [failed, non-blank lines per file, documents per (file, key)]: counts only for files split across ranks.
        vector = np.zeros(1 + num_files + num_files * num_keys, np.int64)
        vector[0] = error is not None
        if stats is not None:
            for file_index, count in stats.partial_nonblank.items():
                vector[1 + file_index] = count
            for (file_index, key_index), count in stats.partial_docs.items():
                vector[1 + num_files + file_index * num_keys + key_index] = count
        total = np.zeros_like(vector)
        comm.Allreduce(vector, total, op=self.MPI.SUM)
        errors = comm.allgather((error, bool(self.abort_requests), user_error))
        # Drain the abort messages still in flight, so none is left unmatched.
        for peer, (_, sent, _) in enumerate(errors):
            if sent and peer != rank and peer not in self.aborts_received:
                self.aborts_received.add(comm.recv(source=peer, tag=_TAG_ABORT))
        self.MPI.Request.Waitall(self.abort_requests)
        self.abort_requests = []

        # Files split across ranks are empty only if no rank saw a non-blank line (or a document) in them.
        split = {r.file_index for part in self.all_ranges for r in part
                 if r.start > 0 or r.end < self.files[r.file_index].size}
        empty_split = [index for index in sorted(split) if total[1 + index] == 0]
        if total[0] == 0 and empty_split and config.strict:
            f = self.files[empty_split[0]]
            error_message = f"{f.path}:1: {empty_file_detail(f)}"
            raise DistributedInputError(error_message, quiet=rank != 0)
        docs = total[1 + num_files:].reshape(num_files, num_keys)
        for index in sorted(split):
            empty_keys = [key for k, key in enumerate(config.json_keys) if docs[index, k] == 0]
            if total[0] == 0 and empty_keys and not config.allow_empty:
                message = empty_input_message(self.files[index], empty_keys, list(config.json_keys),
                                              num_nonblank=int(total[1 + index]))
                if rank == 0:
                    logger.error("%s", message)
                raise DistributedInputError(message, quiet=True)
        if total[0]:
            failures = [(peer, message, user) for peer, (message, _, user) in enumerate(errors) if message]
            user = False
            if failures:
                peer, message, user = failures[0]
                summary = f"preprocessing failed on rank {peer}: {message}"
            else:
                summary = "preprocessing was interrupted on another rank"
            if rank == 0:
                logger.error("%s; no output was written", summary)
            raise _run_error(summary, quiet=True, user=user)

        gathered = comm.gather(stats, root=0)
        if rank != 0:
            return stats
        merged = PreprocessStats(list(config.json_keys))
        for share in gathered:
            merged.merge(share)
        merged.num_files = num_files
        reporter = IssueReporter(self.files, config.strict, config.max_reported)
        for index in empty_split:
            merged.skipped[EMPTY_FILE] += 1
            reporter.report(index, 1, EMPTY_FILE, empty_file_detail(self.files[index]))
        return merged

    # ------------------------------------------------------------------------------------------ merge
    def _merge(self, signals: "_DeferredSignals") -> None:
        """Collective: stream every part to rank 0 in rank order; rank 0 renames the outputs into place.

        A signal received meanwhile fails the merge at the next chunk, but the protocol still runs to its end
        (rank 0 drains what is sent), so no rank is left waiting.
        """
        comm, rank = self.comm, self.rank
        ok, message, user = True, "", False  # user: the failure is the user's to fix (a full disk)
        if rank == 0:
            for key_index, writer in enumerate(self.writers):
                for peer in range(1, self.size):
                    comm.send(key_index, dest=peer, tag=_TAG_GO)
                    peer_ok, problem, peer_user = self._receive_part(writer if ok else None, peer, signals)
                    if ok and not peer_ok:
                        ok, message, user = False, problem, peer_user
            if ok and signals.signum is not None:
                ok, message = False, "interrupted on rank 0"
            if ok:
                try:
                    for writer in self.writers:
                        writer.finalize()
                    self.finalized = True
                except Exception as failure:
                    ok, message = False, f"finalizing the outputs failed: {failure}"
                    user = isinstance(failure, UserError)
            if not ok:
                logger.error("merge failed: %s; no output was written", message)
        else:
            for _ in self.parts:
                key_index = comm.recv(source=0, tag=_TAG_GO)
                self._send_part(self.parts[key_index], signals)
        ok, message, user = comm.bcast((ok, message, user), root=0)
        if not ok:
            raise _run_error(f"merge failed: {message}", quiet=True, user=user)

    def _receive_part(self, writer: IndexedDatasetWriter | None, peer: int,
                      signals: "_DeferredSignals") -> tuple[bool, str, bool]:
        """Append ``peer``'s part to ``writer``; with no writer (after a failure) receive and drop it. Returns
        (ok, what failed, whether that is the user's to fix)."""
        comm, ok, message, user = self.comm, True, "", False
        header = np.zeros(3, np.int64)
        while True:
            comm.Recv(header, source=peer, tag=_TAG_HEADER)
            status, num_sequences, num_tokens = (int(value) for value in header)
            if status != _DATA:
                if status == _END_FAILED and ok:
                    ok, message = False, f"rank {peer} could not send its part (interrupted or unreadable)"
                return ok, message, user
            lengths = np.empty(num_sequences, np.int32)
            tokens = np.empty(num_tokens, self.dtype)
            comm.Recv(lengths, source=peer, tag=_TAG_LENGTHS)
            comm.Recv(tokens, source=peer, tag=_TAG_TOKENS)
            if ok and signals.signum is not None:
                ok, message = False, "interrupted on rank 0"
            if writer is not None and ok:
                try:
                    writer.add_sequences(tokens, lengths, np.arange(1, num_sequences + 1, dtype=np.int64))
                except Exception as failure:
                    ok, message = False, f"writing rank {peer}'s part failed: {failure}"
                    user = isinstance(failure, UserError)

    def _send_part(self, part: PartWriter, signals: "_DeferredSignals") -> None:
        comm = self.comm
        status = _END_OK
        try:
            for tokens, lengths in part.iter_chunks(_MERGE_CHUNK_TOKENS):
                if signals.signum is not None:
                    status = _END_FAILED
                    break
                comm.Send(np.array([_DATA, lengths.size, tokens.size], np.int64), dest=0, tag=_TAG_HEADER)
                comm.Send(np.ascontiguousarray(lengths), dest=0, tag=_TAG_LENGTHS)
                comm.Send(np.ascontiguousarray(tokens), dest=0, tag=_TAG_TOKENS)
        except (OSError, PreprocessError) as failure:
            logger.error("rank %d: reading the part failed: %s", self.rank, failure)
            status = _END_FAILED
        comm.Send(np.array([status, 0, 0], np.int64), dest=0, tag=_TAG_HEADER)

    def _clean_up(self) -> None:
        if not self.finalized:
            for writer in self.writers:
                writer.abort()
        for part in self.parts:
            with contextlib.suppress(OSError):  # a full disk fails the final flush; the directory goes anyway
                part.close()
        if self.tmp_dir is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
