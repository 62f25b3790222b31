"""Only the compiled part of the build; everything else is in pyproject.toml.

The C header reader is optional: without a compiler the install goes on and the Python reader
(`services/extractor/catalog/reader.py`) reads every file.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "services.extractor.catalog._fastreader",
            ["services/extractor/catalog/_fastreader.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
