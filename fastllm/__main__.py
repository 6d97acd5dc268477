"""`python -m fastllm pipeline ...`: the same as the `fastllm` command."""

import sys

from fastllm.cli import main

sys.exit(main())
