"""The sorter service: wiring only (see plugin.py for what it does)."""

from __future__ import annotations

import asyncio

from services.sorter.plugin import MIGRATIONS, SorterPlugin
from shared.service import serve_stage


def main() -> None:
    asyncio.run(serve_stage(SorterPlugin(), MIGRATIONS))


if __name__ == "__main__":
    main()
