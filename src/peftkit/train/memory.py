"""Memory used by one phase (train epoch, evaluation), reported as in HF PEFT's examples::

    GPU Memory before entering the train : 1916
    GPU Memory consumed at the end of the train (end-begin): 66
    GPU Peak Memory consumed during the train (max-begin): 7488
    GPU Total Peak Memory consumed during the train (max): 9404
    CPU Memory before entering the train : 19411
    ...
    CPU Anonymous Memory before entering the train : 1180
    ... (the same four lines for the process's anonymous memory)

All numbers are MB (2**20 bytes, rounded down). GPU numbers are the CUDA caching allocator's
``memory_allocated`` and its peak (reset when the phase begins). CPU numbers are the process's
resident set size from ``/proc/self/status``: ``VmRSS`` now and ``VmHWM`` (the high-water mark),
which writing ``5`` to ``/proc/self/clear_refs`` resets at the start of the phase. Where that
file cannot be written (not Linux, or locked down) a background thread samples the RSS every
20 ms instead.

RSS = anonymous + file-backed (+ shared memory) pages. ``RssAnon`` is memory the process owns
(tensors it allocated, the heap); file-backed pages are mapped files: shared libraries' code,
and weights transformers memory-maps from a safetensors checkpoint, which count in RSS once
touched and stay there while any tensor still views the file, though the kernel may drop them
(they are re-read from disk when used again). So the RSS alone says little about what a run
needs (a 4-bit model that keeps its full-precision source mapped shows the source in its RSS).
The anonymous numbers sit beside the RSS: now from ``RssAnon``, the peak sampled every 10 ms by
a background thread (the kernel keeps no anonymous high-water mark, so a spike shorter than that
can be missed; the RSS peak is exact). The reset is process-wide: ``getrusage``'s ``ru_maxrss`` (what ``/usr/bin/time``
prints) then reports the peak since the last phase began, not since the process started; the
run's ``summary.json`` keeps the true peak (the largest phase peak).

With several processes each rank measures its own phases; rank 0 prints its report and the
maximum over ranks (:meth:`PhaseMemory.max_over`), and ``summary.json`` keeps every rank's
peaks (:func:`rank_peaks`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import resource
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch

MB = 2**20


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            match = re.search(rf"^{field}:\s+(\d+)\s+kB", fh.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def cpu_rss_bytes() -> int:
    """Resident set size now (falls back to the lifetime peak where /proc is missing)."""
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def cpu_anon_bytes() -> int | None:
    """Anonymous resident memory now (``RssAnon``); None where /proc is missing."""
    kb = _status_kb("RssAnon")
    return None if kb is None else kb * 1024


# Trackers now open, outermost first. The kernel keeps one RSS high-water mark per process; a
# tracker that resets it (a step part inside the train phase) first folds the mark reached so
# far into every open tracker, so an outer phase's peak survives its inner parts' resets.
_OPEN: list[MemoryTracker] = []


def _cpu_hwm_bytes() -> int | None:
    kb = _status_kb("VmHWM")
    return None if kb is None else kb * 1024


def _fold_peaks() -> None:
    """Fold the high-water marks reached so far (CPU, and CUDA's peak) into every open tracker."""
    if not _OPEN:
        return
    hwm = _cpu_hwm_bytes()
    gpu = None
    if any(t.cuda for t in _OPEN):
        gpu = torch.cuda.max_memory_allocated()
    for tracker in _OPEN:
        if hwm is not None:
            tracker._cpu_folded = max(tracker._cpu_folded, hwm)
        if gpu is not None and tracker.cuda:
            tracker._gpu_folded = max(tracker._gpu_folded, gpu)


def _reset_cpu_peak() -> bool:
    """Reset the kernel's RSS high-water mark (folded into open trackers first); False when
    not possible."""
    _fold_peaks()
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


class _Sampler(threading.Thread):
    """Peak tracker: samples a reading (the RSS, the anonymous RSS) until stopped."""

    def __init__(self, read=cpu_rss_bytes, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.read = read
        self.interval = interval
        self.peak = read() or 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.peak = max(self.peak, self.read() or 0)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, self.read() or 0)


@dataclasses.dataclass
class PhaseMemory:
    """MB at phase begin, end and peak, for the CPU and (when present) the GPU."""

    phase: str
    cpu_begin: int = 0
    cpu_end: int = 0
    cpu_peak: int = 0
    gpu_begin: int | None = None
    gpu_end: int | None = None
    gpu_peak: int | None = None
    cpu_anon_begin: int | None = None  # RssAnon, the part of the RSS the process owns
    cpu_anon_end: int | None = None
    cpu_anon_peak: int | None = None
    # the train phase's step parts (forward, backward, optimizer): each one's peak, the
    # maximum over the phase's steps (StepParts); None for other phases
    cpu_parts: dict[str, int] | None = None
    gpu_parts: dict[str, int] | None = None

    def lines(self) -> list[str]:
        """The report, in PEFT's wording (plus, for a train phase, where in a step it peaked)."""
        out = []
        devices = [("CPU", self.cpu_begin, self.cpu_end, self.cpu_peak)]
        if self.cpu_anon_begin is not None:
            anon = ("CPU Anonymous", self.cpu_anon_begin, self.cpu_anon_end, self.cpu_anon_peak)
            devices.append(anon)
        if self.gpu_begin is not None:
            devices.insert(0, ("GPU", self.gpu_begin, self.gpu_end, self.gpu_peak))
        else:
            out.append(f"GPU Memory during the {self.phase} : n/a (no CUDA device)")
        for dev, begin, end, peak in devices:
            out += [
                f"{dev} Memory before entering the {self.phase} : {begin}",
                f"{dev} Memory consumed at the end of the {self.phase} (end-begin): {end - begin}",
                f"{dev} Peak Memory consumed during the {self.phase} (max-begin): {peak - begin}",
                f"{dev} Total Peak Memory consumed during the {self.phase} (max): {peak}",
            ]
        phase, _, over = self.phase.partition(" (")  # "train (max over 2 ranks)"
        for dev, parts in (("GPU", self.gpu_parts), ("CPU", self.cpu_parts)):
            if parts:
                names = " / ".join(parts)
                values = " / ".join(str(v) for v in parts.values())
                where = f"{phase}'s {names}" + (f" ({over}" if over else "")
                out.append(f"{dev} Total Peak Memory in the {where} (max): {values}")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "phase"}

    @classmethod
    def max_over(cls, phase: str, ranks: list[dict[str, int | None]]) -> PhaseMemory:
        """Each number's maximum over the ranks' reports (``as_dict`` of each), as one report
        whose phase reads e.g. ``train (max over 2 ranks)``."""
        out = cls(f"{phase} (max over {len(ranks)} ranks)")
        for field in dataclasses.fields(cls):
            if field.name == "phase":
                continue
            values = [r.get(field.name) for r in ranks if r.get(field.name) is not None]
            if values and isinstance(values[0], dict):
                merged = {k: max(v.get(k, 0) for v in values) for k in values[0]}
                setattr(out, field.name, merged)
                continue
            setattr(out, field.name, max(values) if values else None)
        return out


def rank_peaks(memory: list[dict]) -> list[dict[str, int | None]]:
    """Each rank's peak CPU (and GPU) MB over every phase of ``memory`` (entries as the trainer
    keeps them: this rank's numbers, plus ``ranks``, every rank's, when there are several)."""
    per_rank: dict[int, dict[str, int | None]] = {}
    for entry in memory:
        for rank, numbers in enumerate(entry.get("ranks") or [entry]):
            peaks = per_rank.setdefault(
                rank,
                {"rank": rank, "cpu_peak_mb": 0, "cpu_anon_peak_mb": None, "gpu_peak_mb": None},
            )
            peaks["cpu_peak_mb"] = max(peaks["cpu_peak_mb"] or 0, numbers.get("cpu_peak") or 0)
            anon = numbers.get("cpu_anon_peak")
            if anon is not None:
                peaks["cpu_anon_peak_mb"] = max(peaks["cpu_anon_peak_mb"] or 0, anon)
            gpu = numbers.get("gpu_peak")
            if gpu is not None:
                peaks["gpu_peak_mb"] = max(peaks["gpu_peak_mb"] or 0, gpu)
    return [per_rank[r] for r in sorted(per_rank)]


class MemoryTracker:
    """``with MemoryTracker("train") as mem: ...`` then ``mem.result.lines()``.

    Trackers nest: an inner one (a step part) resets the high-water marks, and the outer ones
    keep what was reached before (see ``_OPEN``).
    """

    def __init__(
        self, phase: str, device: torch.device | None = None, sample_anon: bool = True
    ) -> None:
        self.phase = phase
        self.cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
        self.device = device
        self.sample_anon = sample_anon
        self.result = PhaseMemory(phase)
        self._sampler: _Sampler | None = None
        self._anon_sampler: _Sampler | None = None
        self._cpu_folded = 0
        self._gpu_folded = 0

    def __enter__(self) -> MemoryTracker:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            _fold_peaks()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.result.gpu_begin = torch.cuda.memory_allocated(self.device) // MB
        self.result.cpu_begin = cpu_rss_bytes() // MB
        anon = cpu_anon_bytes() if self.sample_anon else None
        if anon is not None:
            self.result.cpu_anon_begin = anon // MB
            self._anon_sampler = _Sampler(cpu_anon_bytes, interval=0.01)
            self._anon_sampler.start()
        if not _reset_cpu_peak():
            self._sampler = _Sampler()
            self._sampler.start()
        _OPEN.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self in _OPEN:
            _OPEN.remove(self)
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.result.gpu_end = torch.cuda.memory_allocated(self.device) // MB
            peak = max(torch.cuda.max_memory_allocated(self.device), self._gpu_folded)
            self.result.gpu_peak = peak // MB
        self.result.cpu_end = cpu_rss_bytes() // MB
        if self._sampler is not None:
            peak = self._sampler.stop()
        else:
            hwm = _cpu_hwm_bytes()
            peak = hwm if hwm is not None else cpu_rss_bytes()
        peak = max(peak, self._cpu_folded)
        self.result.cpu_peak = max(peak // MB, self.result.cpu_begin, self.result.cpu_end)
        if self._anon_sampler is not None:
            anon_peak = self._anon_sampler.stop() // MB
            self.result.cpu_anon_end = (cpu_anon_bytes() or 0) // MB
            self.result.cpu_anon_peak = max(
                anon_peak, self.result.cpu_anon_begin, self.result.cpu_anon_end
            )


class StepParts:
    """Where a training step peaks: the peak memory of each part (``forward``, ``backward``,
    ``optimizer``), the maximum over every step it saw. Each part is a nested
    :class:`MemoryTracker`, so the enclosing phase keeps its own peak; the cost is three
    ``/proc`` reads and one high-water-mark reset per part (microseconds)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.cpu: dict[str, int] = {}
        self.gpu: dict[str, int] = {}

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        with MemoryTracker(name, self.device, sample_anon=False) as tracker:
            yield
        result = tracker.result
        self.cpu[name] = max(self.cpu.get(name, 0), result.cpu_peak)
        if result.gpu_peak is not None:
            self.gpu[name] = max(self.gpu.get(name, 0), result.gpu_peak)

    def add_to(self, memory: PhaseMemory) -> PhaseMemory:
        """``memory`` (the enclosing phase's report) with these parts' peaks."""
        memory.cpu_parts = dict(self.cpu) or None
        memory.gpu_parts = dict(self.gpu) or None
        return memory
