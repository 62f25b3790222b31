"""The anonymizer service: wiring only (see plugin.py for what it does)."""

from __future__ import annotations

import asyncio

from services.anonymizer.plugin import MIGRATIONS, AnonymizerPlugin
from services.anonymizer.worker import quiet_pydicom
from shared.service import serve_stage


def main() -> None:
    quiet_pydicom()
    asyncio.run(serve_stage(AnonymizerPlugin(), MIGRATIONS))


if __name__ == "__main__":
    main()
