"""`python -m bench [--quick | --size tiny|quick|full]` from the repository root: the speed benchmarks of
`tinyllava_nb.bench` (source: nbs/70_bench.ipynb), written to bench/results.json. Same as `tinyllava-nb bench`."""
import sys

from tinyllava_nb.cli import main

sys.exit(main(['bench', *sys.argv[1:]]))
