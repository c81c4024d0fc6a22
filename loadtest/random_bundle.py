"""The old import path of `loadtest.harness.random_bundle`, kept for the GPU device check.

`shared/devcheck/prepare.sh` (outside this repository, read-only to it) runs
`from loadtest.random_bundle import random_run` to export the bundle it carries to the GPU host. The code
lives in `loadtest.harness.random_bundle`; this module only names it here.
"""

from loadtest.harness.random_bundle import RandomRun, random_run

__all__ = ["RandomRun", "random_run"]
