"""The card's clocks, temperature, power and throttle reasons: read, never set.

Read through NVML (the nvidia-ml-py package, ``import pynvml``) when it imports,
else through ``nvidia-smi --query-gpu``, else recorded as unavailable (a CPU run, or
a host with neither). Nothing here changes a clock, a power limit or any other
setting of the card: a measurement describes the card as it was found.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable
from typing import Any, Protocol

from sparsek.runner import smi
from sparsek_remote.schema import CardState

# NVML's clock event ("throttle") reasons, nvml.h; nvidia-smi prints the same bitmask.
REASON_BITS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
# The reasons that mean the clocks were held below what the card would otherwise
# run at because of power or heat. Idle, application clocks and sync boost are not
# flagged: an idle card between cases lowers its clocks by design.
THROTTLING = frozenset({"sw_power_cap", "hw_slowdown", "sw_thermal_slowdown",
                        "hw_thermal_slowdown", "hw_power_brake_slowdown"})
SMI_TIMEOUT_S = 10
_SMI_FIELDS = ("clocks.sm", "clocks.mem", "clocks.max.sm", "temperature.gpu", "power.draw",
               "enforced.power.limit")
# Newer drivers name the bitmask clocks_event_reasons, older ones clocks_throttle_reasons.
_SMI_REASON_FIELDS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")


class CardReader(Protocol):
    def read(self) -> CardState: ...

    def close(self) -> None: ...


def decode_reasons(mask: int) -> list[str]:
    """Names of the bits set in an NVML clock-event-reason mask, unknown bits by value."""
    names = [name for bit, name in REASON_BITS.items() if mask & bit]
    unknown = mask & ~sum(REASON_BITS)
    return names + ([f"unknown_0x{unknown:x}"] if unknown else [])


def throttle_verdict(before: CardState | None, after: CardState | None
                     ) -> tuple[bool | None, str | None]:
    """(throttled, evidence) for a measurement between two readings.

    Throttled when either reading shows a power or thermal reason active, or when
    NVML's running totals of power- or heat-limited time grew between them. None
    when neither reading could see the card.
    """
    seen = [s for s in (before, after) if s is not None and s.source != "unavailable"]
    if not seen:
        return None, None
    evidence = []
    for label, state in (("before", before), ("after", after)):
        active = [r for r in (state.throttle_reasons if state else []) if r in THROTTLING]
        if active:
            evidence.append(f"{label}: {', '.join(active)}")
    for kind in ("power", "thermal"):
        grew = _growth(before, after, f"{kind}_violation_ns")
        if grew:
            evidence.append(f"{kind}-limited for {grew / 1e6:.1f} ms during the timing")
    return bool(evidence), "; ".join(evidence) or None


def _growth(before: CardState | None, after: CardState | None, field: str) -> int:
    if before is None or after is None:
        return 0
    old, new = getattr(before, field), getattr(after, field)
    return max(0, new - old) if old is not None and new is not None else 0


def open_reader(device: str, index: int = 0) -> CardReader:
    """A reader of card ``index`` (NVML's numbering) for a run on ``device``."""
    if device != "cuda":
        return Unavailable("the run is on the CPU")
    try:
        import pynvml
    except ImportError:
        nvml_problem = "nvidia-ml-py (pynvml) is not installed"
    else:
        try:
            return NvmlReader(pynvml, index)
        except pynvml.NVMLError as exc:
            nvml_problem = f"NVML failed to start: {exc}"
    tool = smi.tool()
    if tool is not None:
        return SmiReader(tool, index)
    return Unavailable(f"{nvml_problem}, and nvidia-smi is not on PATH")


class Unavailable:
    def __init__(self, why: str) -> None:
        self.why = why

    def read(self) -> CardState:
        return CardState(source="unavailable", note=self.why[:500])

    def close(self) -> None:
        pass


class NvmlReader:
    """Reads through NVML; each quantity on its own, so one the card does not support
    leaves only that field empty (and named in ``note``)."""

    def __init__(self, nvml: Any, index: int) -> None:
        self.nvml = nvml
        nvml.nvmlInit()
        try:
            self.handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except nvml.NVMLError:
            nvml.nvmlShutdown()
            raise

    def read(self) -> CardState:
        n, h, missing = self.nvml, self.handle, []

        def get(name: str, fn: Callable[[], Any]) -> Any:
            try:
                return fn()
            except (n.NVMLError, AttributeError):
                missing.append(name)
                return None

        sm, mem = getattr(n, "NVML_CLOCK_SM", 1), getattr(n, "NVML_CLOCK_MEM", 2)
        power = get("power", lambda: n.nvmlDeviceGetPowerUsage(h))
        limit = get("power limit", lambda: n.nvmlDeviceGetEnforcedPowerLimit(h))
        mask = get("throttle reasons", self._reason_mask)
        return CardState(
            source="nvml",
            sm_clock_mhz=get("SM clock", lambda: n.nvmlDeviceGetClockInfo(h, sm)),
            memory_clock_mhz=get("memory clock", lambda: n.nvmlDeviceGetClockInfo(h, mem)),
            max_sm_clock_mhz=get("max SM clock", lambda: n.nvmlDeviceGetMaxClockInfo(h, sm)),
            temperature_c=get("temperature", lambda: n.nvmlDeviceGetTemperature(
                h, getattr(n, "NVML_TEMPERATURE_GPU", 0))),
            power_w=None if power is None else power / 1000.0,
            power_limit_w=None if limit is None else limit / 1000.0,
            throttle_reasons=[] if mask is None else decode_reasons(int(mask)),
            power_violation_ns=get("power violations", lambda: self._violation("POWER", 0)),
            thermal_violation_ns=get("thermal violations",
                                     lambda: self._violation("THERMAL", 1)),
            note=("not readable here: " + ", ".join(missing)) if missing else None,
        )

    def _reason_mask(self) -> int:
        n = self.nvml
        fn = getattr(n, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            n.nvmlDeviceGetCurrentClocksThrottleReasons
        return int(fn(self.handle))

    def _violation(self, policy: str, default: int) -> int:
        n = self.nvml
        status = n.nvmlDeviceGetViolationStatus(
            self.handle, getattr(n, f"NVML_PERF_POLICY_{policy}", default))
        return int(status.violationTime)

    def close(self) -> None:
        with contextlib.suppress(self.nvml.NVMLError):
            self.nvml.nvmlShutdown()


class SmiReader:
    """Reads through ``nvidia-smi --query-gpu``; a failed query gives an empty reading
    that says why, never an exception, so the measurement goes on."""

    def __init__(self, tool: str, index: int) -> None:
        self.tool, self.index = tool, index
        self.reason_fields = list(_SMI_REASON_FIELDS)

    def read(self) -> CardState:
        problem = "no answer"
        while self.reason_fields:
            done = self._query(self.reason_fields[0])
            if isinstance(done, list):
                return _smi_state(done)
            problem = done
            if "valid field" not in done:
                break
            self.reason_fields.pop(0)  # this driver knows the other name; remember that
        return CardState(source="unavailable", note=f"nvidia-smi: {problem}"[:500])

    def _query(self, reason_field: str) -> list[str] | str:
        fields = ",".join((*_SMI_FIELDS, reason_field))
        try:
            done = smi.query(fields, index=self.index, units=False, timeout_s=SMI_TIMEOUT_S,
                             path=self.tool)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"could not run: {exc}"
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            said = " ".join((done.stdout + " " + done.stderr).split())
            return f"exit status {done.returncode}: {said[:300]}"
        cells = [cell.strip() for cell in lines[0].split(",")]
        if len(cells) != len(_SMI_FIELDS) + 1:
            return f"unexpected answer {lines[0][:200]!r}"
        return cells

    def close(self) -> None:
        pass


def _smi_state(cells: list[str]) -> CardState:
    sm, mem, max_sm, temp, power, limit = (_smi_number(c) for c in cells[:6])
    mask = _smi_mask(cells[6])
    return CardState(source="nvidia-smi", sm_clock_mhz=sm, memory_clock_mhz=mem,
                     max_sm_clock_mhz=max_sm, temperature_c=temp, power_w=power,
                     power_limit_w=limit,
                     throttle_reasons=[] if mask is None else decode_reasons(mask))


def _smi_number(cell: str) -> float | None:
    """A number nvidia-smi printed, or None for "[N/A]", "[Not Supported]" and the like."""
    try:
        return float(cell)
    except ValueError:
        return None


def _smi_mask(cell: str) -> int | None:
    try:
        return int(cell, 16)
    except ValueError:
        return None
