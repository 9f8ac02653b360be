from dogbread.cli import main

raise SystemExit(main())
