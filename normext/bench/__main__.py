"""Entry point of `python -m normext.bench` (what `make bench` runs); see runner.parse_args for options."""

from normext.bench.runner import main

main()
