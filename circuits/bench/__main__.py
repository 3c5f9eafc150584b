"""`python -m circuits.bench ring` is `circuits bench ring`."""
from circuits.cli import bench

bench(prog_name="python -m circuits.bench")
