"""Build hook for the one optional native module (everything else is in pyproject.toml).

``nsbridge.usernet._flowrelay`` serves UDP and ping for ``nsbridge run`` from a
thread that never takes the GIL for a known flow.  It is optional: without a C compiler
and the Python headers the build skips it and the Python engine serves them, slower.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "nsbridge.usernet._flowrelay",
            ["nsbridge/usernet/_flowrelay.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers"],
            optional=True,
        )
    ]
)
