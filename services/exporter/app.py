"""The exporter service: wiring only (see plugin.py for what it does)."""

from __future__ import annotations

import asyncio

from services.exporter.plugin import MIGRATIONS, ExporterPlugin
from shared.service import serve_stage


def main() -> None:
    asyncio.run(serve_stage(ExporterPlugin(), MIGRATIONS))


if __name__ == "__main__":
    main()
