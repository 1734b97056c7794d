"""The API side of the policy-bypass tests: a long-lived program in the host namespace
that starts one sandbox per request through ``nsbridge.usernet.api``.

Run as ``python3 bypass_driver.py`` (with the checkout on PYTHONPATH); each stdin line is
``{"command", "options"}``, each answer one JSON line with the command's output, exit code,
counters and warnings.  A case then costs a sandbox, not a Python start-up with imports.
"""

from __future__ import annotations

import json
import os
import sys


def driver_main() -> None:
    """Read ``{"command", "options"}`` lines; answer each with the command's output, exit
    code and the run's counters (``Process.stats()``, read after the command ended)."""
    from nsbridge.usernet import api

    for line in sys.stdin:
        request = json.loads(line)
        read_end, write_end = os.pipe()
        try:
            proc = api.run(request["command"], stdout=write_end, **request["options"])
        except Exception as exc:
            os.close(read_end)
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
            continue
        finally:
            os.close(write_end)
        with os.fdopen(read_end) as output:
            text = output.read()
        try:
            code = proc.wait(timeout=60)
            stats = proc.stats()
        finally:
            proc.close()
        print(json.dumps({"code": code, "output": text, "stats": stats,
                          "warnings": proc.warnings}), flush=True)


if __name__ == "__main__":
    driver_main()
