from orca2.cli import entry

entry()
