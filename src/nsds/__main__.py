from nsds.cli import main

raise SystemExit(main())
