from edgezo.cli.main import main

main()
