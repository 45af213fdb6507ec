from orca2.cli import main

main()
