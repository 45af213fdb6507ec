"""`python -m orca2.train` — the entry the deepspeed launcher runs in every rank (`deepspeed --module orca2.train`)."""

import sys

from orca2.cli import main

main(["train", *sys.argv[1:]])
