from meshbus.cli import main

raise SystemExit(main())
