from tuneops.cli import main

main()
