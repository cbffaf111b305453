"""Durable step state in KV: checkpoints, pause records and signals."""

from __future__ import annotations

import attrs
import trio

from . import _wire as wire
from ._errors import SignalTimeout
from ._jetstream import JetStream, KeyValue
from ._model import PauseRecord
from ._transport import Connection


class StepState:
    """Checkpoints and pause records in ``natrio_checkpoints``, signals in ``natrio_signals``."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        js = JetStream(conn)
        self.checkpoints = KeyValue(js, wire.CHECKPOINTS_BUCKET)
        self.signals = KeyValue(js, wire.SIGNALS_BUCKET)

    # -- checkpoints ------------------------------------------------------------------

    async def save_checkpoint(self, run_id: str, step_id: str, state: bytes) -> None:
        """Store a step's checkpoint, replacing the previous one."""
        await self.checkpoints.put(wire.checkpoint_key(run_id, step_id), state)

    async def load_checkpoint(self, run_id: str, step_id: str) -> bytes | None:
        """A step's checkpoint, or None."""
        return await self.checkpoints.get(wire.checkpoint_key(run_id, step_id))

    async def clear(self, run_id: str, step_id: str, *, keep_checkpoint: bool) -> None:
        """Forget a finished step's pause record and, unless kept, its checkpoint."""
        await self.checkpoints.delete(wire.pause_key(run_id, step_id))
        if not keep_checkpoint:
            await self.checkpoints.delete(wire.checkpoint_key(run_id, step_id))

    # -- pauses -----------------------------------------------------------------------

    async def pause_record(self, run_id: str, step_id: str, seq: int) -> PauseRecord | None:
        """The pause record of this task message, if it was ever paused."""
        raw = await self.checkpoints.get(wire.pause_key(run_id, step_id))
        if raw is None:
            return None
        record = PauseRecord.from_json(raw)
        # A record left by an earlier task of the same step does not apply to this one.
        return record if record.seq == seq else None

    async def record_pause(self, run_id: str, step_id: str, seq: int, delivered: int) -> None:
        """Count one more pause of this task message, at delivery ``delivered``."""
        previous = await self.pause_record(run_id, step_id, seq) or PauseRecord(seq, 0, 0)
        record = attrs.evolve(
            previous, pauses=previous.pauses + 1, delivered_at_last_pause=delivered
        )
        await self.checkpoints.put(wire.pause_key(run_id, step_id), record.to_json())

    async def record_return(self, run_id: str, step_id: str, seq: int) -> None:
        """Count one more shutdown return (a NAK that was no failure) of this task message."""
        previous = await self.pause_record(run_id, step_id, seq) or PauseRecord(seq, 0, 0)
        record = attrs.evolve(previous, returns=previous.returns + 1)
        await self.checkpoints.put(wire.pause_key(run_id, step_id), record.to_json())

    # -- signals ----------------------------------------------------------------------

    async def send_signal(self, run_id: str, name: str, data: bytes) -> None:
        """Write a run's signal; a step waiting for it (or starting to wait later) gets ``data``."""
        await self.signals.put(wire.signal_key(run_id, name), data)

    async def wait_for_signal(self, run_id: str, name: str, timeout: float) -> bytes:  # noqa: ASYNC109
        """The signal's data, as soon as it exists; SignalTimeout after ``timeout`` seconds.

        A KV watch: the current value (a signal sent before the wait began) and then every
        update, from one consumer, so none is missed. The watch recreates its consumer
        when the server loses it (a restart, a reconnect, missed heartbeats), reading the
        current value again, so a signal sent meanwhile or afterwards is seen too.
        """
        key = wire.signal_key(run_id, name)
        with trio.move_on_after(timeout):
            async with self.signals.watch(key) as entries:
                async for entry in entries:
                    if entry.header("KV-Operation") not in ("DEL", "PURGE"):
                        return entry.data
        raise SignalTimeout(f"no signal {name!r} for run {run_id} within {timeout} s")
