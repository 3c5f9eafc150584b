"""`python -m circuits` is the `circuits` command."""
from circuits.cli import main

main(prog_name="circuits")
