"""`python -m app.cli ...`: the `genq` command."""
import sys

from app.cli.main import main

sys.exit(main())
