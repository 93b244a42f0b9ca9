from mqstore.cli import main

raise SystemExit(main())
