from graphinfer.cli import main

main()
