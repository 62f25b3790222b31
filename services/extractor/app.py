"""The extractor service: wiring only (see plugin.py for what it does)."""

from __future__ import annotations

import asyncio

from services.extractor.plugin import MIGRATIONS, ExtractorPlugin
from shared.service import serve_stage


def main() -> None:
    asyncio.run(serve_stage(ExtractorPlugin(), MIGRATIONS))


if __name__ == "__main__":
    main()
