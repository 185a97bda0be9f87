"""The one command-line entry every stage shares: `python -m tasks.<stage>` (what dvc.yaml runs).

params.yaml is loaded, the stage runs on the project's layout, and its result is printed
as one line. A user error (bad params, unusable data, a missing or stale artifact) is one
line on stderr naming the fix and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from tasks.config import UserError, load_params
from tasks.layout import Layout
from tasks.preprocess import ImageDecodeError


def stage_main(stage: str, run: Callable[..., Any], describe: Callable[[Any], str]) -> None:
    try:
        params = load_params()
        result = run(params, Layout())
    except (UserError, ImageDecodeError) as exc:
        sys.exit(f"{stage}: {exc}")
    except KeyboardInterrupt:
        sys.exit(f"{stage}: interrupted; the previous outputs are still in place")
    print(describe(result))
