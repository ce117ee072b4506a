from mahir.cli import main

main()
