"""The ``telemetry=`` option of workers and clients, read without importing OpenTelemetry.

natrio imports :mod:`natrio.otel`, and with it OpenTelemetry, only for a worker or client
built with telemetry: the import of natrio, and every task of a worker without it, pay
nothing for the extra (whether it is installed or not).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, cast

from ._errors import ConfigurationError

if TYPE_CHECKING:
    from .otel import Telemetry


def telemetry_option(value: object) -> Telemetry | None:
    """What ``telemetry=value`` asks for: None for ``False`` (or None), a
    :class:`natrio.otel.Telemetry` on the global providers for ``True``, or ``value``
    itself when it is one. Raises ConfigurationError for anything else, and for ``True``
    when OpenTelemetry is not installed."""
    if value is None or value is False:
        return None
    if value is True:
        try:
            from .otel import Telemetry
        except ImportError as exc:
            raise ConfigurationError(
                f"telemetry=True needs OpenTelemetry: pip install 'natrio[otel]' ({exc})"
            ) from None
        return Telemetry()
    # A Telemetry can only have been made with natrio.otel imported, so recognising one
    # needs no import.
    otel = sys.modules.get("natrio.otel")
    if otel is not None and isinstance(value, otel.Telemetry):
        return cast("Telemetry", value)
    raise ConfigurationError(
        f"telemetry must be True, False or a natrio.otel.Telemetry, got {value!r}"
    )
