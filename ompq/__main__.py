"""`python -m ompq ...` is the same as the `ompq` command."""
import sys

from .cli import main

sys.exit(main())
